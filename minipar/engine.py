"""The training engine: one code path for every layout.

``Engine`` builds this rank's model chunks from the layout-independent initialisation, wraps the
parameters in the data-parallel strategy (plain or ZeRO, ``minipar.parallel.data``), and runs
each step (``train_step``, one screen): the executor runs the pipeline program's passes, then
the engine syncs the gradients, measures the global norm, clips and steps. A serial run is the
same engine on a 1 x 1 x 1 mesh: a 1-stage program, a tp group of one, a dp group of one, and
every collective a no-op.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy

from minipar import backend
from minipar.config import ConfigError, ModelConfig, ParallelConfig
from minipar.nn import flops
from minipar.nn.dropout import MaskSource
from minipar.nn.module import BuildContext, matches_prefix
from minipar.models.encdec import build_encdec
from minipar.models.gpt import build_chunks
from minipar.nn.optim import clip_coefficient, make_optimizer
from minipar.nn.precision import LossScaler, policy, policy_of_dtype
from minipar.parallel.data import DataParallelStrategy
from minipar.parallel.pipeline import PipelineExecutor, StepData
from minipar.parallel.schedules import Instr, Step, SyncGrads, chunk_location, make_schedule
from minipar.parallel.zero import make_strategy
from minipar.dist.traced import traced_mesh


@dataclass
class StepResult:
    loss: float  # the global-batch mean loss, identical on every rank
    grad_norm: float  # global gradient norm before clipping
    clip: float  # the factor gradients were scaled by (1.0 when not clipped)
    skipped: bool = False  # the update was skipped (non-finite loss or gradients)
    loss_scale: float = 1.0  # the fp16 loss scale this step's backward used


class Engine:
    """This rank's part of a dp x pp x tp training job."""

    def __init__(self, model: ModelConfig, par: ParallelConfig, mesh, *, seed: int = 0,
                 dtype: str = "float32", optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, grad_clip: float = 1.0, tracer=None,
                 precision: str | None = None, loss_scale: float = 2.0 ** 16,
                 loss_scale_window: int = 200, freeze: tuple[str, ...] = ()):
        model.validate()
        par.validate(model, world_size=mesh.world.size)
        if tracer is not None:  # every collective of every layer becomes a trace event
            mesh = traced_mesh(mesh, tracer)
        self.model_cfg, self.par, self.mesh = model, par, mesh
        # Which dtype where (minipar.nn.precision): --precision, or the older --dtype.
        self.policy = policy(precision) if precision else policy_of_dtype(dtype)
        dtype = self.dtype = self.policy.dtype
        self.scaler = LossScaler(self.policy.loss_scaling, loss_scale, loss_scale_window)
        self.grad_clip = grad_clip
        self.tracer = tracer
        # Dropout masks are addressed by (seed, step, site, global element): see nn/dropout.py.
        self.dropout = MaskSource(seed, model.dropout)
        self.ctx = BuildContext(seed, dtype, mesh.tp, par.sequence_parallel, self.dropout,
                                attention=par.attention, recompute=par.recompute)
        if model.arch == "encdec":
            self.chunks = build_encdec(model, self.ctx, par.pp, par.virtual_stages, mesh.pp_rank)
        else:
            self.chunks = build_chunks(model, self.ctx, par.pp, par.virtual_stages, mesh.pp_rank,
                                       par.partition)
        self.params = [p for c in self.chunks for p in c.params()]
        self.optimizer_name = optimizer
        # Fine-tuning: parameters under a --freeze prefix stay out of the strategy (no update,
        # no optimizer state, no gradient traffic); every rank keeps them whole.
        for p in self.params:
            p.frozen = any(matches_prefix(p.name, f) for f in freeze)
        self.freeze = tuple(freeze)
        self.frozen = [p for p in self.params if p.frozen]
        # The strategy may hook the chunks' units (bucket overlap, ZeRO-3's gathers).
        self.dp: DataParallelStrategy = make_strategy(
            par, self.chunks, mesh, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
            **self._precision_options())
        self.program = make_schedule(par.schedule, par.pp, par.microbatches, par.virtual_stages)
        self.executor = PipelineExecutor(self.program, self.chunks, mesh, dtype, tracer)
        self.step_count = 0
        self._lr = lr
        # Activation memory is measured on the first step (every step has the same shapes, so
        # the same peak), a resumed run's included; set True to measure, and keep memory_log,
        # on every step.
        self.measure_activations = False
        self._measured = False
        self.peak_activation_bytes = 0  # this stage's peak over the steps run so far
        self.memory_log: list = []  # the last step's MemorySample per pass
        self.forward_flops = (0, 0)  # the last step's forward FLOPs here: (all, recomputed)

    def _precision_options(self) -> dict:
        """What the data-parallel strategy needs of the policy (none in fp32/fp64, so the
        strategies are built exactly as before)."""
        if not self.policy.mixed:
            return {}
        return {"grad_dtype": self.policy.grad_dtype(self.par.microbatches), "master": True}

    # -- training -------------------------------------------------------------------------------

    def act_shape(self, rows: int) -> tuple:
        """Shape of what crosses a pipeline boundary: (B_mb, T or T/tp, C)."""
        t = self.model_cfg.seq_len
        if self.par.sequence_parallel:
            t //= self.mesh.tp.size
        return (rows, t, self.model_cfg.d_model)

    def train_step(self, inputs, targets, normalizer: float, lr: float | None = None,
                   skip_nonfinite: bool = False) -> StepResult:
        """One optimizer step on this dp rank's rows of the global batch.

        ``normalizer`` is the number of scored tokens in the whole global batch, so that the
        sum over ranks and microbatches equals the serial mean loss. The executor runs the
        program's passes; its last two instructions, SyncGrads and Step, are the code below.
        """
        scale = self.scaler.scale  # fp16: backward starts from the loss scale, not 1
        # fp16 overflow is an expected event, detected below and handled by skipping the step.
        def quiet():
            return (numpy.errstate(over="ignore", invalid="ignore") if self.scaler.enabled
                    else nullcontext())
        with quiet():
            loss_here = self.gradients(inputs, targets, normalizer)  # 0 off the last stage
        with self._span(SyncGrads()), quiet():
            self.dp.sync_grads()  # sum over dp (buckets may have started during the backward)
            loss, grad_norm = self._loss_and_norm(loss_here)  # the step's one world allreduce
        grad_norm /= scale  # the norm of the true gradient
        self.step_count += 1
        clip = clip_coefficient(grad_norm, self.grad_clip)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)  # alike on every rank
        # fp16 overflow: every rank saw the same non-finite grad_sq, so every rank skips.
        overflow = self.scaler.update(finite)
        if not finite and not skip_nonfinite and not overflow:
            raise FloatingPointError(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) "
                                     f"at step {self.step_count}")
        with self._span(Step()):
            if finite:
                if clip / scale != 1.0:  # clip to the global norm (Pascanu et al. 2013)
                    self.dp.scale_grads(clip / scale)  # and unscale (in fp32 when mixed)
                self.dp.step(self._lr if lr is None else lr)
        return StepResult(loss, grad_norm, clip, skipped=not finite, loss_scale=scale)

    def gradients(self, inputs, targets, normalizer: float, *, step: int | None = None,
                  first_row: int | None = None) -> float:
        """Forward and backward only: every ``Param.grad`` holds this rank's gradient of the
        step's loss, not yet synced over dp; returns this rank's share of the loss. A training
        step continues with the sync and the update; an asynchronous worker sends the gradient
        to a parameter server instead.

        ``step`` (default: the steps taken) and ``first_row`` (default: this dp rank's
        contiguous share, ``dp_rank x rows``) say where these rows sit in which global batch:
        dropout draws the serial run's mask of exactly those rows."""
        data = self._microbatches(inputs, targets, normalizer)
        rows = len(inputs) // self.par.microbatches
        first = self.mesh.dp_rank * len(inputs) if first_row is None else first_row
        self.dropout.begin_step(self.step_count if step is None else step,
                                [first + i * rows for i in range(self.par.microbatches)])
        for chunk in self.chunks:
            chunk.loss_scale = self.scaler.scale
        self.dp.zero_grad()
        return self._run_passes(data)

    def _microbatches(self, inputs, targets, normalizer: float) -> StepData:
        """This rank's rows as the step's microbatches, on the device."""
        m = self.par.microbatches
        if len(inputs) % m:
            raise ConfigError(f"this rank's {len(inputs)} rows are not divisible by "
                              f"--microbatches {m}")
        rows = len(inputs) // m
        xin = backend.from_host(numpy.ascontiguousarray(inputs))
        xtg = backend.from_host(numpy.ascontiguousarray(targets))
        # Each microbatch gets its own buffers, so what a microbatch's caches keep alive is its
        # own rows, not the whole step's batch (views would pin the full array).
        return StepData([xin[i * rows:(i + 1) * rows].copy() for i in range(m)],
                        [xtg[i * rows:(i + 1) * rows].copy() for i in range(m)],
                        float(normalizer), self.act_shape(rows))

    def _run_passes(self, data: StepData) -> float:
        """The program's forward and backward passes (and sends), measuring activation memory
        on this engine's first step or, with ``measure_activations``, on every step."""
        measure = self.measure_activations or not self._measured
        with flops.counting() as counted:  # kernels' forward FLOPs, recomputation included
            loss = self.executor.run(data, measure_memory=measure)
        self.forward_flops = tuple(counted)
        self.memory_log = self.executor.memory_log  # empty when not measured
        self.peak_activation_bytes = max([self.peak_activation_bytes,
                                          *(s.bytes for s in self.memory_log)])
        self._measured = True
        return loss

    def _loss_and_norm(self, loss_here: float) -> tuple[float, float]:
        """The global loss and gradient norm, from ONE allreduce of two floats over the world:
        the last stage's tp rank 0 adds the loss, every rank its share of the squared norm."""
        owns_loss = self.mesh.is_last_stage and self.mesh.tp_rank == 0
        metrics = numpy.array([loss_here if owns_loss else 0.0, self.dp.grad_sq()])
        metrics = backend.to_host(self.mesh.world.allreduce(backend.from_host(metrics)))
        return float(metrics[0]), float(numpy.sqrt(metrics[1]))

    def _span(self, instr: Instr):
        """A trace span named as the program prints ``instr`` (nothing without a tracer)."""
        if self.tracer is None:
            return nullcontext()
        return self.tracer.span(self.program.label(instr), instr.kind)

    # -- evaluation -----------------------------------------------------------------------------

    def forward_only(self, inputs, targets=None):
        """Run the whole model forward on this replica's rows, passing activations stage to
        stage. Returns (predictions (B, T), nll_sum) on the rank holding the head, else None."""
        pp, p = self.mesh.pp, self.par.pp
        n_chunks = p * self.par.virtual_stages
        h = backend.from_host(numpy.ascontiguousarray(inputs))
        tg = None if targets is None else backend.from_host(numpy.ascontiguousarray(targets))
        shape = self.act_shape(len(inputs))
        out = None
        for g in range(n_chunks):
            stage, local = chunk_location(g, p)
            if stage != self.mesh.pp_rank:
                continue
            if g > 0 and chunk_location(g - 1, p)[0] != stage:
                h = pp.recv(shape, self.dtype, chunk_location(g - 1, p)[0], tag=3)
            if g == n_chunks - 1:
                out = self.chunks[local].evaluate(h, tg)
            else:
                h = self.chunks[local].predict(h)
                nxt = chunk_location(g + 1, p)[0]
                if nxt != stage:
                    pp.isend(h, nxt, tag=3).wait()
        return out

    def evaluate(self, batches) -> dict:
        """Exact match and mean loss over held-out batches (global rows, split over dp).

        Every dp rank runs the same number of rows, so collectives inside the forward pass
        (ZeRO-3's parameter gathers) line up: a batch that dp does not divide is padded with
        copies of its first row, which are not counted.
        """
        totals = numpy.zeros(4)  # correct rows, rows, nll sum, scored tokens
        dp, r = self.mesh.dp.size, self.mesh.dp_rank
        for inputs, targets in batches:
            n = len(inputs)
            per = -(-n // dp)
            pad = per * dp - n
            if pad:
                inputs = numpy.concatenate([inputs, numpy.repeat(inputs[:1], pad, axis=0)])
                targets = numpy.concatenate([targets, numpy.repeat(targets[:1], pad, axis=0)])
            lo, hi = r * per, (r + 1) * per
            real = min(hi, n) - lo  # rows of this slice that are not padding
            tg = numpy.array(targets[lo:hi])
            tg[max(real, 0):] = -100  # padded rows score nothing
            out = self.forward_only(inputs[lo:hi], tg)
            if out is not None and self.mesh.tp_rank == 0 and real > 0:
                preds, nll = out
                preds = backend.to_host(preds)[:real]
                ok = ((preds == tg[:real]) | (tg[:real] < 0)).all(axis=1)
                totals += [ok.sum(), len(ok), float(nll), (tg >= 0).sum()]
        totals = backend.to_host(self.mesh.world.allreduce(backend.from_host(totals)))
        mean_nll = totals[2] / max(totals[3], 1)
        return {"exact_match": totals[0] / max(totals[1], 1), "loss": mean_nll,
                "perplexity": float(numpy.exp(min(mean_nll, 50.0)))}

    # -- inspection -----------------------------------------------------------------------------

    def _gather_full(self, local: dict) -> dict:
        """{name: tp-local host array} of this rank's parameters -> {name: full array} of the
        whole model, on every rank (collective over tp, then over the world for the stages)."""
        tp = self.mesh.tp
        full = {}
        for p in self.params:
            if p.name not in local:
                continue
            arr = local[p.name]
            if p.sharding is not None:
                arr = p.sharding.full(tp.allgather_obj(arr), p.full_shape)
            full[p.name] = arr
        merged: dict = {}
        for part in self.mesh.world.allgather_obj(full if self.mesh.dp_rank == 0 else {}):
            merged.update(part)
        return merged

    def full_params(self, grads: bool = False) -> dict:
        """Every full (unsharded) parameter or gradient by name, on every rank (collective).

        Used by tests (parallel == serial) and checkpoints: the result does not depend on the
        layout. Gathers over dp (ZeRO shards), tp (tensor shards) and the world (stages). A
        frozen parameter has no gradient: it is in the parameters, not in the gradients.
        """
        local = self.dp.local_params(grads)
        if not grads:
            local.update({p.name: backend.to_host(p.data) for p in self.frozen})
        return self._gather_full(local)

    def full_optimizer_state(self) -> dict:
        """{"<param>/<state>": full array} for the whole model, on every rank (collective)."""
        by_state: dict = {}
        for name, states in self.dp.local_optimizer_state().items():
            for key, arr in states.items():
                by_state.setdefault(key, {})[name] = arr
        out = {}
        for key in sorted(by_state):
            for name, arr in self._gather_full(by_state[key]).items():
                out[f"{name}/{key}"] = arr
        return out

    def optimizer_steps(self) -> int:
        return self.dp.optimizer_steps

    def load_full_state(self, params: dict, optim: dict, optimizer_steps: int) -> None:
        """Cut this rank's shards out of full tensors (a checkpoint from any layout)."""
        missing = sorted({p.name for p in self.params} - set(params))
        if missing:
            raise ValueError(f"checkpoint lacks parameters {missing[:5]}")
        local_params, local_optim = {}, {}
        for p in self.params:
            full = params[p.name]
            if tuple(full.shape) != p.full_shape:
                raise ValueError(f"checkpoint parameter {p.name} has shape {full.shape}, "
                                 f"the model needs {p.full_shape}")
            cut = (lambda a: a) if p.sharding is None else p.sharding.local
            local_params[p.name] = cut(full).astype(self.dtype)
            states = {k.split("/")[-1]: v for k, v in optim.items()
                      if k.rsplit("/", 1)[0] == p.name}
            local_optim[p.name] = {k: cut(v).astype(self.policy.master_dtype)
                                   for k, v in states.items()}
        for p in self.frozen:  # outside the strategy: loaded here, kept whole
            p.data[...] = backend.from_host(local_params[p.name])
        self.dp.load_local(local_params, local_optim, optimizer_steps)

    def init_weights(self, params: dict) -> None:
        """Fine-tuning (``--init-from``): this rank's shards of the full ``params`` (a
        checkpoint of any layout and ZeRO stage), with a fresh optimizer: zero state, step 0."""
        names = make_optimizer(self.optimizer_name, [], 0.0, 0.0).state_names
        fresh = {f"{p.name}/{k}": numpy.zeros(p.full_shape, dtype=self.policy.master_dtype)
                 for p in self.params if not p.frozen for k in names}
        self.load_full_state(params, fresh, 0)

    def memory(self) -> dict:
        mem = dict(self.dp.memory())
        mem["params"] += sum(int(p.data.nbytes) for p in self.frozen)  # whole on every rank
        mem["activations_peak"] = self.peak_activation_bytes
        return mem
