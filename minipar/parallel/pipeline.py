"""Pipeline execution: one executor runs any schedule program on real ranks.

The executor is a dispatch table from instruction type to a small method. It knows nothing about
GPipe or 1F1B: the schedule (``minipar.parallel.schedules``) decided the order, the executor
only does what each instruction says. Activations and gradients move as contiguous arrays with
``isend`` (completed at ``SyncGrads``, the end of the step's passes) and blocking ``recv``,
exactly the semantics the program checks prove deadlock-free. Because every send is
non-blocking, two stages that both block in ``recv`` can only be waiting for a message the
program never sends; MPI's rendezvous protocol for large messages does not change that, since a
posted ``isend`` completes as soon as its receive is posted.

Memory. A microbatch's caches are freed by the backward pass that pops them (``Module.pop``), so
a stage holds exactly the microbatches the program has started and not finished. With
``measure_memory`` the executor checks this after every pass: it records the bytes the caches
keep alive and the (microbatch, chunk) pairs that still hold any, giving the measured peak per
stage that the program checker's ``peak_live`` predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minipar import backend
from minipar.nn.module import arrays_in, owner, unique_bytes, walk
from minipar.parallel import schedules as S

TAG_ACT, TAG_GRAD = 1, 2


@dataclass
class StepData:
    """One step's microbatches for this rank: inputs and targets (host or device arrays)."""

    inputs: list  # per microbatch (B_mb, T) token ids (used by the first chunk)
    targets: list  # per microbatch (B_mb, T) targets (used by the last chunk)
    normalizer: float  # scored tokens in the whole global batch


@dataclass
class _State:
    acts_in: dict = field(default_factory=dict)  # (mb, chunk) -> received activation
    acts_out: dict = field(default_factory=dict)  # (mb, chunk) -> produced activation
    grads_in: dict = field(default_factory=dict)  # (mb, chunk) -> received output gradient
    grads_out: dict = field(default_factory=dict)  # (mb, chunk) -> produced input gradient
    sends: list = field(default_factory=list)  # outstanding isend requests and their buffers
    loss: float = 0.0


@dataclass(frozen=True)
class MemorySample:
    """What this stage holds right after one pass: bytes kept alive and live (mb, chunk) pairs."""

    label: str  # the pass, as the program prints it (F3, B2.1, W0, ...)
    bytes: int
    live: int  # (mb, chunk) pairs holding caches or deferred weight-gradient inputs
    live_full: int  # pairs whose input-gradient pass has not run (the whole activation stack)


# ------------------------------------------------------------------------- activation memory
def _held(modules_per_chunk):
    """(local chunk, mb, held object, is a module cache) for every cache and deferred W input."""
    for j, modules in enumerate(modules_per_chunk):
        for m in modules:
            for mb, cache in m._cache.items():
                yield j, mb, cache, True
            # WeightGradMixin keeps (dy, cache) per microbatch between B and W (zero bubble).
            for mb, pending in m.__dict__.get("_pending", {}).items():
                yield j, mb, pending, False


class MemoryProbe:
    """Reads what a stage's chunks hold for pending backward passes (see the module doc)."""

    def __init__(self, chunks) -> None:
        self.modules = [list(walk(c)) for c in chunks]
        self.params = [p for c in chunks for p in c.params()]

    def activation_bytes(self) -> int:
        """Bytes the caches keep alive for pending backward passes.

        Every distinct array held by a module cache or a deferred weight-gradient pass, counted
        once, except parameter storage: a linear layer caches its weight next to its input, and
        that weight is not activation memory (``Module.cache_bytes`` counts it per microbatch).
        """
        # Read p.data now, not at construction: ZeRO-3 swaps in gathered weights per unit.
        params = {id(owner(p.data)) for p in self.params}
        return unique_bytes(arrays_in([h for _, _, h, _ in _held(self.modules)]), exclude=params)

    def live_pairs(self) -> tuple[set, set]:
        """(pairs holding anything, pairs holding module caches) as (mb, local chunk) sets."""
        live, full = set(), set()
        for j, mb, _, is_cache in _held(self.modules):
            if mb == "_eval":
                continue
            live.add((mb, j))
            if is_cache:
                full.add((mb, j))
        return live, full


# ---------------------------------------------------------------------------------- executor
class PipelineExecutor:
    """Runs this stage's instruction list of a program over this rank's model chunks.

    ``on_sync`` and ``on_step`` are the engine's gradient sync and optimizer step, called where
    the program says ``SyncGrads`` and ``Step``. ``tracer`` (optional) records every event.
    With ``measure_memory`` every pass appends a ``MemorySample`` to ``memory_log`` and
    ``peak_activation_bytes`` is the largest ``bytes`` seen (0 when not measured).
    """

    def __init__(self, program: S.Program, chunks, mesh, act_shape, dtype, on_sync, on_step,
                 tracer=None, measure_memory: bool = False):
        self.program = program
        self.stage = mesh.pp_rank
        self.p = program.n_stages
        self.chunks = chunks
        self.pp = mesh.pp
        self.act_shape = act_shape  # (B_mb, T_local, C): what crosses a stage boundary
        self.dtype = dtype
        self.on_sync = on_sync
        self.on_step = on_step
        self.tracer = tracer
        self.measure_memory = measure_memory
        self.memory_log: list[MemorySample] = []
        self.peak_activation_bytes = 0
        self._probe: MemoryProbe | None = None
        self.dispatch = {
            S.Fwd: self._fwd, S.Bwd: self._bwd, S.BwdInput: self._bwd_input,
            S.BwdWeight: self._bwd_weight, S.SendAct: self._send_act, S.RecvAct: self._recv_act,
            S.SendGrad: self._send_grad, S.RecvGrad: self._recv_grad,
            S.SyncGrads: self._sync, S.Step: self._step,
        }

    def run(self, data: StepData) -> float:
        """Execute the step; returns this rank's share of the loss (0 off the last stage)."""
        self.data = data
        self.st = _State()
        n_chunks = self.program.n_chunks
        for instr in self.program.stages[self.stage]:
            if self.tracer is not None:
                args = {k: getattr(instr, k) for k in ("mb", "chunk") if hasattr(instr, k)}
                with self.tracer.span(instr.label_for(n_chunks), instr.kind, **args):
                    self.dispatch[type(instr)](instr)
            else:
                self.dispatch[type(instr)](instr)
            if self.measure_memory and isinstance(instr, S.COMPUTE):
                self._sample(instr)
        leftovers = [d for d in (self.st.acts_in, self.st.acts_out, self.st.grads_in,
                                 self.st.grads_out) if d]
        if leftovers:
            raise RuntimeError(f"pipeline stage {self.stage}: program left unconsumed data "
                               f"{[sorted(d) for d in leftovers]}")
        return self.st.loss

    def _sample(self, instr) -> None:
        if self._probe is None:
            self._probe = MemoryProbe(self.chunks)
        nbytes = self._probe.activation_bytes()
        live, full = self._probe.live_pairs()
        self.memory_log.append(MemorySample(self.program.label(instr), nbytes, len(live),
                                            len(full)))
        self.peak_activation_bytes = max(self.peak_activation_bytes, nbytes)

    # -- helpers --------------------------------------------------------------------------------

    def _global(self, chunk: int) -> int:
        return S.global_chunk(self.stage, chunk, self.p)

    def _is_first(self, chunk: int) -> bool:
        return self._global(chunk) == 0

    def _is_last(self, chunk: int) -> bool:
        return self._global(chunk) == self.p * self.program.n_chunks - 1

    # -- compute ------------------------------------------------------------------------------

    def _fwd(self, ins) -> None:
        key = (ins.mb, ins.chunk)
        chunk = self.chunks[ins.chunk]
        if self._is_first(ins.chunk):
            x = self.data.inputs[ins.mb]
        elif key in self.st.acts_in:
            x = self.st.acts_in.pop(key)
        else:  # p == 1 with several chunks: the previous chunk's output stays on this rank
            x = self.st.acts_out.pop((ins.mb, ins.chunk - 1))
        if self._is_last(ins.chunk):
            loss = chunk.forward(x, ins.mb, self.data.targets[ins.mb], self.data.normalizer)
            self.st.loss += float(loss)
        else:
            self.st.acts_out[key] = chunk.forward(x, ins.mb)

    def _output_grad(self, ins):
        key = (ins.mb, ins.chunk)
        if self._is_last(ins.chunk):
            return None
        if key in self.st.grads_in:
            return self.st.grads_in.pop(key)
        return self.st.grads_out.pop((ins.mb, ins.chunk + 1))  # local hand-off when p == 1

    def _store_input_grad(self, ins, dx) -> None:
        if not self._is_first(ins.chunk):
            self.st.grads_out[(ins.mb, ins.chunk)] = dx

    def _bwd(self, ins) -> None:
        dx = self.chunks[ins.chunk].backward(self._output_grad(ins), ins.mb)
        self._store_input_grad(ins, dx)

    def _bwd_input(self, ins) -> None:
        chunk = self.chunks[ins.chunk]
        dx = chunk.backward(self._output_grad(ins), ins.mb, defer_weight_grads=True)
        self._store_input_grad(ins, dx)

    def _bwd_weight(self, ins) -> None:
        self.chunks[ins.chunk].backward_weights(ins.mb)

    # -- communication -------------------------------------------------------------------------

    def _isend(self, store: dict, ins, tag: int) -> None:
        # One contiguous buffer per message, kept referenced until its send completes.
        buf = backend.xp().ascontiguousarray(store.pop((ins.mb, ins.chunk)))
        dest = S.peer(self.stage, ins, self.p)
        self.st.sends.append((self.pp.isend(buf, dest, tag), buf))

    def _recv(self, store: dict, ins, tag: int) -> None:
        src = S.peer(self.stage, ins, self.p)
        store[(ins.mb, ins.chunk)] = self.pp.recv(self.act_shape, self.dtype, src, tag)

    def _send_act(self, ins) -> None:
        self._isend(self.st.acts_out, ins, TAG_ACT)

    def _recv_act(self, ins) -> None:
        self._recv(self.st.acts_in, ins, TAG_ACT)

    def _send_grad(self, ins) -> None:
        self._isend(self.st.grads_out, ins, TAG_GRAD)

    def _recv_grad(self, ins) -> None:
        self._recv(self.st.grads_in, ins, TAG_GRAD)

    def _sync(self, ins) -> None:
        for req, _buf in self.st.sends:
            req.wait()
        self.st.sends.clear()
        self.on_sync(self.st.loss)

    def _step(self, ins) -> None:
        self.on_step()


__all__ = ["PipelineExecutor", "StepData", "MemorySample", "MemoryProbe", "TAG_ACT", "TAG_GRAD"]
