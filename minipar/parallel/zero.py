"""ZeRO stages 1-3 (Rajbhandari et al. 2019): shard the model states over the dp group.

Every dp rank keeps the same flat buffer layout of its (tp-local) parameters (``FlatLayout``),
padded so that each segment splits into dp equal slices; dp rank r owns the r-th slice of every
segment (one segment, the contiguous 1/dp of the buffer, unless gradients are bucketed or the
stage is 3). With b bytes per element, Psi the elements of this rank's parameters and
Psi' = ceil(Psi / dp) x dp, ``memory()`` reports exactly what a rank keeps across steps:

    stage   params            grads             optimizer (K = 2 for AdamW m, v; 1 for SGD)
    0       Psi b             Psi b             K Psi b
    1       Psi' b            Psi' b            K Psi'/dp b
    2       Psi' b            Psi'/dp b         K Psi'/dp b
    3       S b               S b               K S b,   S = sum over units of ceil(n_u / dp)

(stages 1-2 keep the flat, padded parameter and gradient buffers the collectives fill; ZeRO-2's
full gradient exists only from ``zero_grad`` to the end of ``sync_grads``, ZeRO-3's gathered
unit only while the unit runs.)

Communication per step, as ``CommStats`` records it on the dp group (e = element bytes, m
microbatches):

- stage 1, 2: reduce-scatter of the padded flat gradient (Psi' e, one call, or one per bucket
  with ``bucket_mb``: blocking calls as buckets fill, since ``Comm`` has no non-blocking
  reduce-scatter), then ONE allgather of the updated parameters (Psi' e). Each rank updates only
  its slice, with the same ``adamw_update``/``sgd_update`` arithmetic as the unsharded
  optimizer, so the run equals the serial one to float64 rounding.
- stage 3: the unit is the granule (the embedding, each block, the head): per microbatch an
  allgather of each unit's padded parameters before its forward and again before its backward,
  and a reduce-scatter of its gradients right after its backward (each ceil(n_u/dp) dp e), added
  into the rank's gradient shard; no allgather after the step. A tied LM head borrows the
  embedding's matrix: the embedding's gather stays alive from the embedding's forward through the
  head's, and from the head's backward through the embedding's, so it is still one gather per
  pass; its gradient is reduced after the embedding's backward, the last to add to it.

After the dp reduction, gradients that are partial sums over tp (sequence parallelism) are
allreduced over tp once per step, only over this rank's shard of them.
"""

from __future__ import annotations

from minipar import backend
from minipar.config import ConfigError
from minipar.nn.module import Hooks
from minipar.nn.optim import make_optimizer
from minipar.parallel.data import DataParallel, FlatLayout, GradSync, params_used, unit_owners


class ShardOptimizer:
    """AdamW or SGD state for this rank's shard only, updated by the unsharded optimizer's own
    per-array rule (so the arithmetic, hyperparameters and step count are the same)."""

    def __init__(self, name: str, size: int, dtype, lr: float, weight_decay: float):
        self.rule = make_optimizer(name, [], lr, weight_decay)
        self.weight_decay = weight_decay
        self.state = {k: backend.xp().zeros(size, dtype=dtype) for k in self.rule.state_names}

    @property
    def step_count(self) -> int:
        return self.rule.step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self.rule.step_count = value

    def update(self, data, grad, start: int, decay: bool, lr: float) -> None:
        """One step on ``data`` (a run of the shard starting at ``start``), in place."""
        state = {k: a[start:start + data.size] for k, a in self.state.items()}
        self.rule._update(data, grad, state, lr, self.weight_decay if decay else 0.0)

    def state_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self.state.values())


class ShardedState:
    """What every ZeRO stage does with its shard: clip, update, norm, tp sync, checkpoints."""

    layout: FlatLayout
    optimizer: ShardOptimizer

    def _param_view(self, flat: int, shard: int, n: int): ...
    def _grad_view(self, flat: int, shard: int, n: int): ...

    def _plan_runs(self) -> None:
        tp_rank = self.mesh.tp_rank
        self._decay_runs = self.layout.runs(lambda p: bool(p.decay))
        # A tensor replicated over tp counts towards the norm on tp rank 0 only.
        self._norm_runs = [r for r in self.layout.runs(
            lambda p: p.sharding is not None or tp_rank == 0) if r[0]]
        self._partial_runs = [r for r in self.layout.runs(lambda p: p.tp_partial_grad) if r[0]]

    def _sync_tp_partial(self) -> None:
        tp = self.mesh.tp
        if tp.size == 1 or not self._partial_runs:
            return
        views = [self._grad_view(*r[1:]) for r in self._partial_runs]
        flat = backend.xp().concatenate(views)
        tp.allreduce_(flat)
        offset = 0
        for v in views:
            v[...] = flat[offset:offset + v.size]
            offset += v.size

    def grad_sq(self) -> float:
        """This rank's share of the global squared gradient norm: its own gradient shard."""
        total = 0.0
        for r in self._norm_runs:
            g = self._grad_view(*r[1:])
            total += float((g * g).sum())
        return total

    def _update_shard(self, lr: float, clip_coef: float) -> None:
        self.optimizer.step_count += 1
        for decay, flat, shard, n in self._decay_runs:
            g = self._grad_view(flat, shard, n)
            if clip_coef != 1.0:
                g *= clip_coef
            self.optimizer.update(self._param_view(flat, shard, n), g, shard, decay, lr)

    @property
    def optimizer_steps(self) -> int:
        return self.optimizer.step_count

    def optimizer_state_local(self) -> dict:
        """{param name: {state name: tp-local array}}: the dp shards gathered (collective)."""
        out: dict = {p.name: {} for p in self.layout.params}
        for key, shard in self.optimizer.state.items():
            flat = backend.xp().zeros(self.layout.total, dtype=shard.dtype)
            self.layout.unshard(self.mesh.dp.allgather(shard), flat)
            for i, p in enumerate(self.layout.params):
                out[p.name][key] = self.layout.view(flat, i).copy()
        return out

    def _flat_from(self, arrays: dict):
        flat = backend.xp().zeros(self.layout.total, dtype=self.dtype)
        for i, p in enumerate(self.layout.params):
            self.layout.view(flat, i)[...] = backend.from_host(arrays[p.name])
        return flat

    def load_local(self, local_params: dict, local_optim: dict, optimizer_steps: int) -> None:
        """Take this rank's shards of full tp-local tensors (from a checkpoint of any layout)."""
        self._load_params(self._flat_from(local_params))
        for key, shard in self.optimizer.state.items():
            try:
                states = {p.name: local_optim[p.name][key] for p in self.layout.params}
            except KeyError as exc:
                raise ValueError(f"checkpoint lacks optimizer state {key!r} for {exc}") from None
            shard[...] = self.layout.shard_of(self._flat_from(states))
        self.optimizer.step_count = optimizer_steps


class ZeRO1(ShardedState, GradSync):
    """ZeRO stage 1: optimizer state sharded; full parameters and gradients on every rank."""

    zero = 1
    sharded = True

    def __init__(self, params, mesh, optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, bucket_mb: float = 0.0,
                 microbatches: int | None = None):
        super().__init__(params, mesh, bucket_mb, microbatches)
        xp, lay = backend.xp(), self.layout
        self.flat_param = xp.zeros(lay.total, dtype=self.dtype)
        for i, p in enumerate(lay.params):
            view = lay.view(self.flat_param, i)
            view[...] = p.data
            p.data = view  # parameters live in the flat buffer the allgather refills
        self.optimizer = ShardOptimizer(optimizer, lay.shard_size, self.dtype, lr, weight_decay)
        self.flat_grad = None
        self.grad_shard = None if self.zero == 1 else xp.zeros(lay.shard_size, dtype=self.dtype)
        if self.zero == 1:
            self._new_flat_grad()
        self._plan_runs()

    def _new_flat_grad(self) -> None:
        self.flat_grad = backend.xp().zeros(self.layout.total, dtype=self.dtype)
        self._bind_grads(self.flat_grad)

    def zero_grad(self) -> None:
        if self.flat_grad is None:
            self._new_flat_grad()
        else:
            self.flat_grad.fill(0)
            self._bind_grads(self.flat_grad)
        self._reset_step()

    def _adopt(self, k: int) -> None:
        if self.flat_grad is None:  # backward ran without zero_grad: start from zeros
            self._new_flat_grad()
        super()._adopt(k)

    def _sync_segment(self, k: int, overlap: bool) -> None:
        seg = self.layout.segments[k]
        mine = self.mesh.dp.reduce_scatter(self.flat_grad[seg.start:seg.start + seg.size])
        self._grad_view(self.layout.local(k).start, seg.shard_start, mine.size)[...] = mine

    def _after_sync(self) -> None:
        self._sync_tp_partial()
        if self.zero >= 2:  # keep only the shard: the full gradient is dropped
            self._drop_flat_grad()

    def _drop_flat_grad(self) -> None:
        self.flat_grad = None
        for p in self.layout.params:
            p.grad = None

    def _param_view(self, flat: int, shard: int, n: int):
        return self.flat_param[flat:flat + n]

    def _grad_view(self, flat: int, shard: int, n: int):
        if self.grad_shard is not None:
            return self.grad_shard[shard:shard + n]
        return self.flat_grad[flat:flat + n]

    def step(self, lr: float, clip_coef: float = 1.0) -> None:
        """Update this rank's slice, then allgather every rank's slice into the full buffer."""
        self._update_shard(lr, clip_coef)
        gathered = self.mesh.dp.allgather(self.layout.shard_of(self.flat_param))
        self.layout.unshard(gathered, self.flat_param)

    def materialize(self) -> None:
        """Full (dp-summed) gradients in ``p.grad`` for inspection (parameters are always full)."""
        if self.grad_shard is None:
            mine = self.layout.shard_of(self.flat_grad)
        else:
            mine = self.grad_shard
            self._new_flat_grad()
        self.layout.unshard(self.mesh.dp.allgather(mine), self.flat_grad)

    def release(self) -> None:
        if self.zero >= 2:
            self._drop_flat_grad()

    def _load_params(self, flat) -> None:
        self.flat_param[...] = flat

    def memory(self) -> dict:
        grads = self.flat_grad if self.grad_shard is None else self.grad_shard
        return {"params": int(self.flat_param.nbytes), "grads": int(grads.nbytes),
                "optimizer": self.optimizer.state_bytes()}


class ZeRO2(ZeRO1):
    """ZeRO stage 2: gradients sharded too; after the reduce-scatter only the shard is kept."""

    zero = 2


class ZeRO3Hooks(Hooks):
    """Gather a unit's parameters before it runs, free them after, reduce its gradients."""

    def __init__(self, strategy: "ZeRO3"):
        self.strategy = strategy

    def pre_forward(self, unit, mb) -> None:
        self.strategy.acquire(self.strategy.plan[id(unit)]["first_fwd"])

    def post_forward(self, unit, mb) -> None:
        self.strategy.release_groups(self.strategy.plan[id(unit)]["last_fwd"])

    def pre_backward(self, unit, mb) -> None:
        self.strategy.acquire(self.strategy.plan[id(unit)]["last_fwd"])

    def post_backward(self, unit, mb) -> None:
        plan = self.strategy.plan[id(unit)]
        for g in plan["owned"]:
            self.strategy.reduce_group(g)
        self.strategy.release_groups(plan["first_fwd"])


class ZeRO3(ShardedState):
    """ZeRO stage 3: parameters sharded too; each unit is gathered only while it runs.

    Between uses a Param holds no data (``p.data is None``) and no gradient; ``materialize``
    gathers everything for inspection and ``release`` frees it again. The layout needs the
    model's units, so it is built in ``install_hooks`` (the engine calls it right away).
    """

    zero = 3

    def __init__(self, params, mesh, optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, bucket_mb: float = 0.0,
                 microbatches: int | None = None):
        if bucket_mb > 0:
            raise ConfigError("--bucket-mb applies to --zero 0, 1, 2: --zero 3 already "
                              "reduce-scatters each unit's gradients as its backward ends")
        self.params = list(params)
        self.mesh = mesh
        self.dtype = self.params[0].data.dtype
        self._optimizer_args = (optimizer, lr, weight_decay)
        self.layout = None

    def install_hooks(self, chunks) -> None:
        units, owner = unit_owners(chunks, self.params)
        groups = [[p for p in self.params if owner[id(p)] == u] for u in range(len(units))]
        kept = [u for u in range(len(units)) if groups[u]]
        self.layout = FlatLayout.grouped([groups[u] for u in kept], self.mesh.dp.size,
                                         self.mesh.dp_rank)
        full = backend.xp().zeros(self.layout.total, dtype=self.dtype)
        for i, p in enumerate(self.layout.params):
            self.layout.view(full, i)[...] = p.data
        self.param_shard = self.layout.shard_of(full)
        self.grad_shard = backend.xp().zeros(self.layout.shard_size, dtype=self.dtype)
        self.optimizer = ShardOptimizer(self._optimizer_args[0], self.layout.shard_size,
                                        self.dtype, *self._optimizer_args[1:])
        for p in self.params:
            p.data, p.grad = None, None
        self._live = [0] * len(self.layout.segments)
        self.plan = self._make_plan(chunks, units, {u: g for g, u in enumerate(kept)})
        for chunk in chunks:
            chunk.hooks = ZeRO3Hooks(self)
        self._plan_runs()

    def _make_plan(self, chunks, units, group_of_unit) -> dict:
        """Per unit: the groups it gathers first and frees last in forward (backward reverses
        both), and the group whose gradients it reduces."""
        segment_of = {id(self.layout.params[i]): g for g, seg in enumerate(self.layout.segments)
                      for i in seg.params}
        plan, u = {}, 0
        for chunk in chunks:
            first, last = {}, {}
            for unit in chunk.units:
                for g in sorted({segment_of[id(p)] for p in params_used(unit)}):
                    first.setdefault(g, id(unit))
                    last[g] = id(unit)
            for unit in chunk.units:
                plan[id(unit)] = {
                    "first_fwd": [g for g, who in first.items() if who == id(unit)],
                    "last_fwd": [g for g, who in last.items() if who == id(unit)],
                    "owned": [group_of_unit[u]] if u in group_of_unit else []}
                u += 1
        return plan

    # -- gather, free, reduce --------------------------------------------------------------------

    def acquire(self, groups) -> None:
        for g in groups:
            self._live[g] += 1
            if self._live[g] == 1:
                self._gather(g)

    def release_groups(self, groups) -> None:
        for g in groups:
            self._live[g] -= 1
            if self._live[g] == 0:
                for i in self.layout.segments[g].params:
                    self.layout.params[i].data = None

    def _gather(self, g: int) -> None:
        full = self._gather_slice(self.param_shard, g)
        start = self.layout.segments[g].start
        for i in self.layout.segments[g].params:
            self.layout.params[i].data = self.layout.view(full, i, start)

    def _gather_slice(self, shard, g: int):
        seg = self.layout.segments[g]
        c = seg.size // self.layout.dp
        return self.mesh.dp.allgather(shard[seg.shard_start:seg.shard_start + c])  # (size,)

    def reduce_group(self, g: int) -> None:
        """Reduce-scatter group g's gradients into the shard and drop the full ones."""
        seg = self.layout.segments[g]
        buf = backend.xp().zeros(seg.size, dtype=self.dtype)
        for i in seg.params:
            p = self.layout.params[i]
            if p.grad is not None:
                self.layout.view(buf, i, seg.start)[...] = p.grad
                p.grad = None
        mine = self.mesh.dp.reduce_scatter(buf)
        self.grad_shard[seg.shard_start:seg.shard_start + mine.size] += mine

    # -- the step --------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        self.grad_shard.fill(0)
        for p in self.params:
            p.grad = None

    def sync_grads(self) -> None:
        """Units reduced their gradients during backward; reduce any left (a unit that had no
        backward), then sum the tp-partial ones over tp."""
        for g, seg in enumerate(self.layout.segments):
            if any(self.layout.params[i].grad is not None for i in seg.params):
                self.reduce_group(g)
        self._sync_tp_partial()

    def _param_view(self, flat: int, shard: int, n: int):
        return self.param_shard[shard:shard + n]

    def _grad_view(self, flat: int, shard: int, n: int):
        return self.grad_shard[shard:shard + n]

    def step(self, lr: float, clip_coef: float = 1.0) -> None:
        """Update the shard; the next forward gathers the new parameters."""
        self._update_shard(lr, clip_coef)

    def materialize(self) -> None:
        """Gather every unit's parameters and gradients (for inspection and checkpoints)."""
        self.acquire(range(len(self.layout.segments)))
        for g, seg in enumerate(self.layout.segments):
            full = self._gather_slice(self.grad_shard, g)
            for i in seg.params:
                self.layout.params[i].grad = self.layout.view(full, i, seg.start)

    def release(self) -> None:
        """Free what ``materialize`` gathered."""
        self.release_groups(range(len(self.layout.segments)))
        for p in self.params:
            p.grad = None

    def _load_params(self, flat) -> None:
        self.param_shard[...] = self.layout.shard_of(flat)

    def memory(self) -> dict:
        return {"params": int(self.param_shard.nbytes), "grads": int(self.grad_shard.nbytes),
                "optimizer": self.optimizer.state_bytes()}


ZERO_STAGES = {1: ZeRO1, 2: ZeRO2, 3: ZeRO3}


def strategy_class(zero: int) -> type:
    """The data-parallel strategy for a ZeRO stage (0 = plain allreduce, no sharding); the stage
    was validated with the rest of the configuration."""
    return DataParallel if zero == 0 else ZERO_STAGES[zero]
