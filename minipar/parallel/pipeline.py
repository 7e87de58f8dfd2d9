"""Pipeline execution: one executor runs any schedule program on real ranks.

The executor is a dispatch table from instruction type to a small method. It knows nothing about
GPipe or 1F1B: the schedule (``minipar.parallel.schedules``) decided the order, the executor
only does what each instruction says. Activations and gradients move as contiguous arrays with
``isend`` (completed at the end of the step) and blocking ``recv``, exactly the semantics the
program checks prove deadlock-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    sends: list = field(default_factory=list)  # outstanding isend requests
    loss: float = 0.0


class PipelineExecutor:
    """Runs this stage's instruction list of a program over this rank's model chunks.

    ``on_sync`` and ``on_step`` are the engine's gradient sync and optimizer step, called where
    the program says ``SyncGrads`` and ``Step``. ``tracer`` (optional) records every event.
    """

    def __init__(self, program: S.Program, chunks, mesh, act_shape, dtype, on_sync, on_step,
                 tracer=None):
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
        for instr in self.program.stages[self.stage]:
            if self.tracer is not None:
                with self.tracer.span(instr.label_for(self.program.n_chunks), instr.kind,
                                      mb=getattr(instr, "mb", None)):
                    self.dispatch[type(instr)](instr)
            else:
                self.dispatch[type(instr)](instr)
        leftovers = [d for d in (self.st.acts_in, self.st.acts_out, self.st.grads_in,
                                 self.st.grads_out) if d]
        if leftovers:
            raise RuntimeError(f"pipeline stage {self.stage}: program left unconsumed data "
                               f"{[sorted(d) for d in leftovers]}")
        return self.st.loss

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

    def _send_act(self, ins) -> None:
        dest, _ = S.act_dest(self.stage, ins.chunk, self.p)
        buf = self.st.acts_out.pop((ins.mb, ins.chunk))
        self.st.sends.append((self.pp.isend(buf, dest, TAG_ACT), buf))

    def _recv_act(self, ins) -> None:
        src = (self.stage - 1) % self.p
        self.st.acts_in[(ins.mb, ins.chunk)] = self.pp.recv(self.act_shape, self.dtype, src,
                                                             TAG_ACT)

    def _send_grad(self, ins) -> None:
        dest, _ = S.grad_dest(self.stage, ins.chunk, self.p)
        buf = self.st.grads_out.pop((ins.mb, ins.chunk))
        self.st.sends.append((self.pp.isend(buf, dest, TAG_GRAD), buf))

    def _recv_grad(self, ins) -> None:
        src = (self.stage + 1) % self.p
        self.st.grads_in[(ins.mb, ins.chunk)] = self.pp.recv(self.act_shape, self.dtype, src,
                                                              TAG_GRAD)

    def _sync(self, ins) -> None:
        for req, _buf in self.st.sends:  # the buffers stay referenced until their send is done
            req.wait()
        self.st.sends.clear()
        self.on_sync(self.st.loss)

    def _step(self, ins) -> None:
        self.on_step()
