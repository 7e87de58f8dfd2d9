"""Pipeline execution: one executor runs any schedule program's passes on real ranks.

The executor is a dispatch table from instruction type to a small method. It knows nothing about
GPipe or 1F1B: the schedule (``minipar.parallel.schedules``) decided the order, the executor
only does what each instruction says. Activations and gradients move as contiguous arrays with
``isend`` (completed when the passes end) and blocking ``recv``, exactly the semantics the
program checks prove deadlock-free. Because every send is non-blocking, two stages that both
block in ``recv`` can only be waiting for a message the program never sends; MPI's rendezvous
protocol for large messages does not change that, since a posted ``isend`` completes as soon as
its receive is posted.

Every stage's program ends with ``SyncGrads`` then ``Step`` (the checker requires it): the
executor runs the passes before them and hands back the loss, and the engine carries out those
two in plain code (``Engine.train_step``).

Memory. A microbatch's caches are freed by the backward pass that pops them (``Module.pop``), so
a stage holds exactly the microbatches the program has started and not finished. With
``measure_memory`` the executor reads the activation meter (``minipar.nn.memory``) after every
pass: the bytes the caches keep alive and the (microbatch, chunk) pairs that still hold any,
giving the measured peak per stage that the program checker's ``peak_live`` predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minipar import backend
from minipar.nn import memory
from minipar.parallel import schedules as S

TAG_ACT, TAG_GRAD = 1, 2


@dataclass
class StepData:
    """One step's microbatches for this rank: inputs and targets (host or device arrays)."""

    inputs: list  # per microbatch (B_mb, T) token ids (used by the first chunk)
    targets: list  # per microbatch (B_mb, T) targets (used by the last chunk)
    normalizer: float  # scored tokens in the whole global batch
    act_shape: tuple  # (B_mb, T or T/tp, C): what crosses a stage boundary
    # The encoder-decoder's messages differ by boundary: {global chunk g: shape of the message
    # into g} (x_enc, memory, or the pair (x_dec, memory) packed; minipar.models.encdec_pipeline)
    boundary_shapes: dict | None = None


@dataclass
class _State:
    acts_in: dict = field(default_factory=dict)  # (mb, chunk) -> received activation
    acts_out: dict = field(default_factory=dict)  # (mb, chunk) -> produced activation
    grads_in: dict = field(default_factory=dict)  # (mb, chunk) -> received output gradient
    grads_out: dict = field(default_factory=dict)  # (mb, chunk) -> produced input gradient
    sends: list = field(default_factory=list)  # outstanding isend requests and their buffers
    loss: float = 0.0


class PipelineExecutor:
    """Runs the passes of this stage's instruction list over this rank's model chunks.

    ``tracer`` (optional) records every instruction as a span. After a ``run`` with
    ``measure_memory``, ``memory_log`` holds one ``memory.MemorySample`` per pass (else it is
    empty).
    """

    def __init__(self, program: S.Program, chunks, mesh, dtype, tracer=None):
        self.program = program
        self.stage = mesh.pp_rank
        self.p = program.n_stages
        self.chunks = chunks
        self.pp = mesh.pp
        self.dtype = dtype
        self.tracer = tracer
        self.memory_log: list[memory.MemorySample] = []
        self.dispatch = {
            S.Fwd: self._fwd, S.Bwd: self._bwd, S.BwdInput: self._bwd_input,
            S.BwdWeight: self._bwd_weight, S.SendAct: self._send_act, S.RecvAct: self._recv_act,
            S.SendGrad: self._send_grad, S.RecvGrad: self._recv_grad,
        }

    def run(self, data: StepData, measure_memory: bool = False) -> float:
        """Run the step's passes, every instruction before ``SyncGrads``, and complete the
        sends; returns this rank's share of the loss (0 off the last stage)."""
        *passes, sync, step = self.program.stages[self.stage]
        if not (isinstance(sync, S.SyncGrads) and isinstance(step, S.Step)):
            raise ValueError(f"stage {self.stage}'s program must end with SyncGrads(), Step()")
        self.data, self.st, self.memory_log = data, _State(), []
        for instr in passes:
            self._execute(instr)
            if measure_memory and isinstance(instr, S.COMPUTE):
                self.memory_log.append(memory.sample(self.chunks, self.program.label(instr)))
        for request, _buf in self.st.sends:  # the passes are over: complete every send
            request.wait()
        leftovers = [d for d in (self.st.acts_in, self.st.acts_out, self.st.grads_in,
                                 self.st.grads_out) if d]
        if leftovers:
            raise RuntimeError(f"pipeline stage {self.stage}: program left unconsumed data "
                               f"{[sorted(d) for d in leftovers]}")
        return self.st.loss

    def _execute(self, instr) -> None:
        if self.tracer is None:
            self.dispatch[type(instr)](instr)
            return
        args = {k: getattr(instr, k) for k in ("mb", "chunk") if hasattr(instr, k)}
        with self.tracer.span(self.program.label(instr), instr.kind, **args):
            self.dispatch[type(instr)](instr)

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
        if getattr(chunk, "reads_inputs", False) and not self._is_first(ins.chunk):
            x = (self.data.inputs[ins.mb], x)  # ids are data on every stage, not a transfer
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

    def _recv(self, store: dict, ins, tag: int, g: int) -> None:
        """Receive the message into (or the gradient out of) global chunk g."""
        src = S.peer(self.stage, ins, self.p)
        shapes = self.data.boundary_shapes
        shape = self.data.act_shape if shapes is None else shapes[g]
        store[(ins.mb, ins.chunk)] = self.pp.recv(shape, self.dtype, src, tag)

    def _send_act(self, ins) -> None:
        self._isend(self.st.acts_out, ins, TAG_ACT)

    def _recv_act(self, ins) -> None:
        self._recv(self.st.acts_in, ins, TAG_ACT, self._global(ins.chunk))

    def _send_grad(self, ins) -> None:
        self._isend(self.st.grads_out, ins, TAG_GRAD)

    def _recv_grad(self, ins) -> None:
        self._recv(self.st.grads_in, ins, TAG_GRAD, self._global(ins.chunk) + 1)


__all__ = ["PipelineExecutor", "StepData", "TAG_ACT", "TAG_GRAD"]
