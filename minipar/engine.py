"""The training engine: one code path for every layout.

``Engine`` builds this rank's model chunks from the layout-independent initialisation, wraps the
parameters in the data-parallel strategy (plain or ZeRO), and runs each step as a pipeline
program through the executor. A serial run is the same engine on a 1 x 1 x 1 mesh: a 1-stage
program, a tp group of one, a dp group of one, and every collective a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from minipar import backend
from minipar.config import ConfigError, ModelConfig, ParallelConfig
from minipar.nn.module import BuildContext
from minipar.models.gpt import build_chunks
from minipar.nn.optim import clip_coefficient
from minipar.parallel.pipeline import PipelineExecutor, StepData
from minipar.parallel.schedules import chunk_location, make_schedule
from minipar.parallel.zero import strategy_class
from minipar.dist.traced import traced_mesh


@dataclass
class StepResult:
    loss: float  # the global-batch mean loss, identical on every rank
    grad_norm: float  # global gradient norm before clipping
    clip: float  # the factor gradients were scaled by (1.0 when not clipped)
    skipped: bool = False  # the update was skipped (non-finite loss or gradients)


class Engine:
    """This rank's part of a dp x pp x tp training job."""

    def __init__(self, model: ModelConfig, par: ParallelConfig, mesh, *, seed: int = 0,
                 dtype: str = "float32", optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, grad_clip: float = 1.0, tracer=None):
        model.validate()
        par.validate(model, world_size=mesh.world.size)
        if tracer is not None:  # every collective of every layer becomes a trace event
            mesh = traced_mesh(mesh, tracer)
        self.model_cfg, self.par, self.mesh = model, par, mesh
        self.dtype = dtype
        self.grad_clip = grad_clip
        self.tracer = tracer
        self.ctx = BuildContext(seed, dtype, mesh.tp, par.sequence_parallel)
        self.chunks = build_chunks(model, self.ctx, par.pp, par.virtual_stages, mesh.pp_rank)
        self.params = [p for c in self.chunks for p in c.params()]
        dp_class = strategy_class(par.zero)
        kwargs = {"bucket_mb": par.bucket_mb, "microbatches": par.microbatches}
        self.dp = dp_class(self.params, mesh, optimizer=optimizer, lr=lr,
                           weight_decay=weight_decay, **kwargs)
        self.dp.install_hooks(self.chunks)
        self.program = make_schedule(par.schedule, par.pp, par.microbatches, par.virtual_stages)
        self.step_count = 0
        self._lr = lr
        # Activation memory is measured on the first step (every step has the same shapes, so
        # the same peak); set True to measure, and keep memory_log, on every step.
        self.measure_activations = False
        self.peak_activation_bytes = 0  # this stage's peak over the steps run so far
        self.memory_log: list = []  # the last step's MemorySample per pass

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
        sum over ranks and microbatches equals the serial mean loss.
        """
        m = self.par.microbatches
        if len(inputs) % m:
            raise ConfigError(f"this rank's {len(inputs)} rows are not divisible by "
                              f"--microbatches {m}")
        rows = len(inputs) // m
        xin = backend.from_host(numpy.ascontiguousarray(inputs))
        xtg = backend.from_host(numpy.ascontiguousarray(targets))
        # Each microbatch gets its own buffers, so what a microbatch's caches keep alive is its
        # own rows, not the whole step's batch (views would pin the full array).
        data = StepData([xin[i * rows:(i + 1) * rows].copy() for i in range(m)],
                        [xtg[i * rows:(i + 1) * rows].copy() for i in range(m)], float(normalizer))
        lr = self._lr if lr is None else lr
        result: dict = {}

        def on_sync(loss_local: float) -> None:
            self.dp.sync_grads()
            owns_loss = self.mesh.is_last_stage and self.mesh.tp_rank == 0
            metrics = numpy.array([loss_local if owns_loss else 0.0, self.dp.grad_sq()])
            metrics = backend.to_host(self.mesh.world.allreduce(backend.from_host(metrics)))
            norm = float(numpy.sqrt(metrics[1]))
            result.update(loss=float(metrics[0]), grad_norm=norm,
                          clip=clip_coefficient(norm, self.grad_clip))

        def on_step() -> None:
            # Every rank sees the same allreduced loss and norm, so all decide alike.
            if not numpy.isfinite(result["loss"]) or not numpy.isfinite(result["grad_norm"]):
                if skip_nonfinite:
                    result["skipped"] = True
                    return
                raise FloatingPointError(
                    f"non-finite loss ({result['loss']}) or gradient norm "
                    f"({result['grad_norm']}) at step {self.step_count + 1}")
            self.dp.step(lr, result["clip"])

        self.dp.zero_grad()
        executor = PipelineExecutor(self.program, self.chunks, self.mesh, self.act_shape(rows),
                                    self.dtype, on_sync, on_step, self.tracer,
                                    measure_memory=self.measure_activations
                                    or self.step_count == 0)
        executor.run(data)
        self.memory_log = executor.memory_log
        self.peak_activation_bytes = max(self.peak_activation_bytes,
                                         executor.peak_activation_bytes)
        self.step_count += 1
        return StepResult(result["loss"], result["grad_norm"], result["clip"],
                          result.get("skipped", False))

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
        layout. Gathers over tp (shards) and then over the world (pipeline stages).
        """
        self.dp.materialize()
        try:
            local = {p.name: backend.to_host(p.grad if grads else p.data) for p in self.params}
        finally:
            self.dp.release()
        return self._gather_full(local)

    def _optimizer_state_local(self) -> dict:
        """{param name: {state name: tp-local array}} (ZeRO gathers its dp shards first)."""
        if hasattr(self.dp, "optimizer_state_local"):
            return self.dp.optimizer_state_local()
        return {name: dict(st) for name, st in self.dp.optimizer.state.items()}

    def full_optimizer_state(self) -> dict:
        """{"<param>/<state>": full array} for the whole model, on every rank (collective)."""
        by_state: dict = {}
        for name, states in self._optimizer_state_local().items():
            for key, arr in states.items():
                by_state.setdefault(key, {})[name] = backend.to_host(arr)
        out = {}
        for key in sorted(by_state):
            for name, arr in self._gather_full(by_state[key]).items():
                out[f"{name}/{key}"] = arr
        return out

    def optimizer_steps(self) -> int:
        return int(getattr(self.dp, "optimizer_steps", None) or self.dp.optimizer.step_count)

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
            local_optim[p.name] = {k: cut(v).astype(self.dtype) for k, v in states.items()}
        if hasattr(self.dp, "load_local"):
            self.dp.load_local(local_params, local_optim, optimizer_steps)
            return
        for p in self.params:
            p.data[...] = backend.from_host(local_params[p.name])
            for key, arr in self.dp.optimizer.state[p.name].items():
                arr[...] = backend.from_host(local_optim[p.name][key])
        self.dp.optimizer.step_count = optimizer_steps

    def memory(self) -> dict:
        mem = dict(self.dp.memory())
        mem["activations_peak"] = getattr(self, "peak_activation_bytes", 0)
        return mem
