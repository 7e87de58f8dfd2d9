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
- stage 3: the unit is the granule (the embedding, each block, the head), and the parameters
  each unit finishes are one *segment*: per microbatch an allgather of each unit's padded
  segment before its forward and again before its backward, and a reduce-scatter of its
  gradients right after its backward (each ceil(n_u/dp) dp e), added into the rank's gradient
  shard; no allgather after the step. A tied LM head borrows the
  embedding's matrix: the embedding's gather stays alive from the embedding's forward through the
  head's, and from the head's backward through the embedding's, so it is still one gather per
  pass; its gradient is reduced after the embedding's backward, the last to add to it.

After the dp reduction, gradients that are partial sums over tp (sequence parallelism) are
allreduced over tp once per step, only over this rank's shard of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipar import backend
from minipar.nn.module import Hooks
from minipar.nn.optim import make_optimizer, master_step
from minipar.nn.precision import square_sum
from minipar.parallel.data import (
    BucketedDataParallel, Buckets, DataParallel, DataParallelStrategy, allreduce_views,
    params_dtype, params_used, state_of, trainable_params, unit_owners,
)
from minipar.parallel.flat import FlatLayout, bucket_count


class ShardOptimizer:
    """AdamW or SGD state for this rank's shard only, updated by the unsharded optimizer's own
    per-array rule (so the arithmetic, hyperparameters and step count are the same)."""

    def __init__(self, name: str, size: int, dtype, lr: float, weight_decay: float,
                 master=None):
        """``master``: this rank's shard of the 16-bit parameters under mixed precision; the
        state is then fp32 and keeps the fp32 master copy of the shard ("master")."""
        self.rule = make_optimizer(name, [], lr, weight_decay)
        self.weight_decay = weight_decay
        self.master = master is not None
        self.grad_factor = 1.0  # unscale and clip, applied in fp32 at the step (master only)
        dtype = "float32" if self.master else dtype
        self.state = {k: backend.xp().zeros(size, dtype=dtype) for k in self.rule.state_names}
        if self.master:
            self.state["master"] = master.astype("float32")

    @property
    def step_count(self) -> int:
        return self.rule.step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self.rule.step_count = value

    def update(self, data, grad, start: int, decay: bool, lr: float) -> None:
        """One step on ``data`` (a run of the shard starting at ``start``), in place."""
        state = {k: a[start:start + data.size] for k, a in self.state.items()}
        wd = self.weight_decay if decay else 0.0
        if self.master:
            master_step(self.rule, data, grad, state, self.grad_factor, lr, wd)
        else:
            self.rule._update(data, grad, state, lr, wd)

    def state_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self.state.values())


class ShardedState(DataParallelStrategy):
    """What every ZeRO stage does with the shard it owns: norm, clipping, update, tp sync,
    checkpoints. A stage says where its shard lives: ``_param_view``/``_grad_view`` (a run of
    the shard, by its flat-buffer and shard coordinates), ``_param_shard``/``_grad_shard``
    (the whole shard) and ``_load_params`` (a full flat buffer in)."""

    layout: FlatLayout
    optimizer: ShardOptimizer

    def _param_view(self, flat: int, shard: int, n: int): ...
    def _grad_view(self, flat: int, shard: int, n: int): ...
    def _param_shard(self): ...
    def _grad_shard(self): ...
    def _load_params(self, flat) -> None: ...

    def _plan_runs(self) -> None:
        """Runs of the shard (``FlatLayout.runs``) by weight decay (every element: update and
        clipping), by counting in the norm, and the tp-partial ones."""
        tp_rank = self.mesh.tp_rank
        self._decay_runs = self.layout.runs(lambda p: bool(p.decay))
        # A tensor replicated over tp counts towards the norm on tp rank 0 only.
        self._norm_runs = [r for r in self.layout.runs(
            lambda p: p.sharding is not None or tp_rank == 0) if r[0]]
        self._partial_runs = [r for r in self.layout.runs(lambda p: p.tp_partial_grad) if r[0]]

    def _sync_tp_partial(self) -> None:
        """Sum over tp the tp-partial gradients in this rank's shard (the rest is not ours)."""
        if self.mesh.tp.size > 1 and self._partial_runs:
            allreduce_views(self.mesh.tp, [self._grad_view(*r[1:]) for r in self._partial_runs])

    def grad_sq(self) -> float:
        """This rank's share of the global squared gradient norm: its own gradient shard."""
        total = 0.0
        for r in self._norm_runs:
            total += square_sum(self._grad_view(*r[1:]))
        return total

    def scale_grads(self, factor: float) -> None:
        if self.optimizer.master:  # applied to the fp32 gradient at the step
            self.optimizer.grad_factor *= factor
            return
        for _, flat, shard, n in self._decay_runs:
            g = self._grad_view(flat, shard, n)
            g *= factor

    def _update_shard(self, lr: float) -> None:
        self.optimizer.step_count += 1
        for decay, flat, shard, n in self._decay_runs:
            self.optimizer.update(self._param_view(flat, shard, n),
                                  self._grad_view(flat, shard, n), shard, decay, lr)
        self.optimizer.grad_factor = 1.0

    def _by_name(self, shard) -> dict:
        """{name: host array} of the full tensors whose shards every dp rank holds (allgather)."""
        flat = backend.xp().zeros(self.layout.total, dtype=shard.dtype)
        self.layout.unshard(self.mesh.dp.allgather(shard), flat)
        return {p.name: backend.to_host(self.layout.view(flat, i))
                for i, p in enumerate(self.layout.params)}

    def local_params(self, grads: bool = False) -> dict:
        return self._by_name(self._grad_shard() if grads else self._param_shard())

    def local_optimizer_state(self) -> dict:
        out: dict = {p.name: {} for p in self.layout.params}
        for key, shard in self.optimizer.state.items():
            for name, arr in self._by_name(shard).items():
                out[name][key] = arr
        return out

    def _flat_from(self, arrays: dict, dtype=None):
        flat = backend.xp().zeros(self.layout.total, dtype=dtype or self.dtype)
        for i, p in enumerate(self.layout.params):
            self.layout.view(flat, i)[...] = backend.from_host(arrays[p.name])
        return flat

    def load_local(self, params: dict, optim: dict, optimizer_steps: int) -> None:
        self._load_params(self._flat_from(params))
        for key, shard in self.optimizer.state.items():
            states = {p.name: state_of(optim, p.name, key) for p in self.layout.params}
            shard[...] = self.layout.shard_of(self._flat_from(states, shard.dtype))
        self.optimizer.step_count = optimizer_steps


# -- stages 1 and 2: the flat buffers of data parallelism, reduce-scattered --------------------

class ZeRO1(Buckets, ShardedState):
    """ZeRO stage 1: optimizer state sharded; every rank keeps the full parameters and the full
    flat gradient. The gradient is reduce-scattered (a rank receives the dp sum of its slice),
    each rank updates its slice, and one allgather shares the updated parameters."""

    def __init__(self, chunks, mesh, *, optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, bucket_mb: float = 0.0,
                 microbatches: int | None = None, grad_dtype: str | None = None,
                 master: bool = False):
        self.params = trainable_params(chunks)  # frozen ones stay whole on every rank
        self.mesh = mesh
        self.dtype = params_dtype(chunks)
        self.grad_dtype = backend.xp().dtype(grad_dtype or self.dtype)
        dp = mesh.dp.size
        padded = -(-sum(int(p.data.size) for p in self.params) // dp) * dp
        n = bucket_count(padded * self.grad_dtype.itemsize, bucket_mb, padded // dp)
        self.layout = FlatLayout.contiguous(self.params, dp, mesh.dp_rank, n, sharded=True)
        self.flat_param = backend.xp().zeros(self.layout.total, dtype=self.dtype)
        for i, p in enumerate(self.layout.params):
            view = self.layout.view(self.flat_param, i)
            view[...] = p.data
            p.data = view  # parameters live in the flat buffer the allgather refills
        shard = self.layout.shard_of(self.flat_param) if master else None
        self.optimizer = ShardOptimizer(optimizer, self.layout.shard_size, self.dtype, lr,
                                        weight_decay, shard)
        self._keep_grads()
        self._plan_runs()
        self._watch(chunks, microbatches, overlap=bucket_mb > 0)

    def _keep_grads(self) -> None:
        """The full flat gradient lives across steps; a rank's reduced slice is written in it."""
        self.flat_grad = backend.xp().zeros(self.layout.total, dtype=self.grad_dtype)
        self._grads = self.layout.bind_grads(self.flat_grad)

    def zero_grad(self) -> None:
        self.flat_grad.fill(0)
        self._grads = self.layout.bind_grads(self.flat_grad)
        self._new_step()

    def _sync_bucket(self, k: int) -> None:
        """Reduce-scatter bucket k: this rank receives the dp sum of its slice of it."""
        seg = self.layout.segments[k]
        mine = self.mesh.dp.reduce_scatter(self.flat_grad[seg.span])
        self._grad_view(self.layout.local(k).start, seg.shard_start, mine.size)[...] = mine

    def sync_grads(self) -> None:
        self._sync_remaining_buckets()
        self._sync_tp_partial()

    def step(self, lr: float) -> None:
        """Update this rank's slice, then allgather every rank's slice into the full buffer."""
        self._update_shard(lr)
        gathered = self.mesh.dp.allgather(self.layout.shard_of(self.flat_param))
        self.layout.unshard(gathered, self.flat_param)

    def _param_view(self, flat: int, shard: int, n: int):
        return self.flat_param[flat:flat + n]

    def _grad_view(self, flat: int, shard: int, n: int):
        return self.flat_grad[flat:flat + n]

    def _param_shard(self):
        return self.layout.shard_of(self.flat_param)

    def _grad_shard(self):
        return self.layout.shard_of(self.flat_grad)

    def _load_params(self, flat) -> None:
        self.flat_param[...] = flat

    def memory(self) -> dict[str, int]:
        return {"params": int(self.flat_param.nbytes), "grads": int(self.flat_grad.nbytes),
                "optimizer": self.optimizer.state_bytes()}


class ZeRO2(ZeRO1):
    """ZeRO stage 2: gradients sharded too. The full flat gradient exists only from
    ``zero_grad`` to the end of ``sync_grads``; across steps a rank keeps its reduced slice."""

    def _keep_grads(self) -> None:
        self.grad_shard = backend.xp().zeros(self.layout.shard_size, dtype=self.grad_dtype)
        self.flat_grad = None

    def zero_grad(self) -> None:
        self.flat_grad = backend.xp().zeros(self.layout.total, dtype=self.grad_dtype)
        self._grads = self.layout.bind_grads(self.flat_grad)
        self._new_step()

    def sync_grads(self) -> None:
        super().sync_grads()
        self.flat_grad = None  # the full gradient is dropped: only the shard is kept
        for p in self.params:
            p.grad = None

    def _grad_view(self, flat: int, shard: int, n: int):
        return self.grad_shard[shard:shard + n]

    def _grad_shard(self):
        return self.grad_shard

    def memory(self) -> dict[str, int]:
        return {"params": int(self.flat_param.nbytes), "grads": int(self.grad_shard.nbytes),
                "optimizer": self.optimizer.state_bytes()}


# -- stage 3: parameters sharded, each unit's segment gathered while it runs -------------------

@dataclass(frozen=True)
class UnitSegments:
    """The segments one unit gathers, frees and reduces (ZeRO-3). In forward a unit gathers the
    segments it is the first of its chunk to use and frees those it is the last to use;
    backward runs the other way round."""

    first: tuple[int, ...]  # segments this unit is the first in its chunk to use in forward
    last: tuple[int, ...]  # segments this unit is the last in its chunk to use in forward
    owned: tuple[int, ...]  # the segment of the parameters whose gradient it finishes


class ZeRO3Hooks(Hooks):
    """Gather a unit's segments before it runs, free them after, reduce its gradients."""

    def __init__(self, zero3: "ZeRO3"):
        self.zero3 = zero3

    def pre_forward(self, unit, mb) -> None:
        self.zero3.acquire_segments(self.zero3.plan[id(unit)].first)

    def post_forward(self, unit, mb) -> None:
        self.zero3.release_segments(self.zero3.plan[id(unit)].last)

    def pre_backward(self, unit, mb) -> None:
        self.zero3.acquire_segments(self.zero3.plan[id(unit)].last)

    def post_backward(self, unit, mb) -> None:
        plan = self.zero3.plan[id(unit)]
        for k in plan.owned:
            self.zero3.reduce_segment(k)
        self.zero3.release_segments(plan.first)


class ZeRO3(ShardedState):
    """ZeRO stage 3: parameters sharded too; each unit's segment is gathered only while it runs.

    Between uses a Param holds no data (``p.data is None``) and no gradient: the rank keeps only
    its shards of the parameters, gradients and optimizer state.
    """

    def __init__(self, chunks, mesh, *, optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, grad_dtype: str | None = None, master: bool = False):
        self.params = trainable_params(chunks)  # frozen ones stay whole on every rank
        self.mesh = mesh
        self.dtype = params_dtype(chunks)
        self.grad_dtype = backend.xp().dtype(grad_dtype or self.dtype)
        units, owner = unit_owners(chunks, self.params)
        finished_by = [[p for p in self.params if owner[id(p)] == u] for u in range(len(units))]
        self.layout = FlatLayout.segmented([ps for ps in finished_by if ps], mesh.dp.size,
                                           mesh.dp_rank)
        full = backend.xp().zeros(self.layout.total, dtype=self.dtype)
        for i, p in enumerate(self.layout.params):
            self.layout.view(full, i)[...] = p.data
        self.param_shard = self.layout.shard_of(full)
        # Gradients are reduce-scattered per microbatch in the working dtype (16-bit on the
        # wire) and accumulate in grad_dtype (fp32 when microbatches accumulate).
        self.grad_shard = backend.xp().zeros(self.layout.shard_size, dtype=self.grad_dtype)
        self.optimizer = ShardOptimizer(optimizer, self.layout.shard_size, self.dtype, lr,
                                        weight_decay, self.param_shard if master else None)
        for p in self.params:
            p.data, p.grad = None, None
        self._live = [0] * len(self.layout.segments)  # units using each gathered segment
        self.plan = self._plan(chunks, owner)
        for chunk in chunks:
            chunk.hooks = ZeRO3Hooks(self)
        self._plan_runs()

    def _plan(self, chunks, owner: dict[int, int]) -> dict[int, UnitSegments]:
        """{id(unit): UnitSegments}; ``owner`` maps id(param) to the unit finishing it."""
        segment_of = {id(self.layout.params[i]): k for k, seg in enumerate(self.layout.segments)
                      for i in seg.params}
        plan, u = {}, 0
        for chunk in chunks:
            first, last = {}, {}
            for unit in chunk.units:
                for k in sorted({segment_of[id(p)] for p in params_used(unit)
                                 if id(p) in segment_of}):  # frozen ones are never gathered
                    first.setdefault(k, id(unit))
                    last[k] = id(unit)
            for unit in chunk.units:
                owned = {segment_of[id(p)] for p in self.params if owner[id(p)] == u}
                plan[id(unit)] = UnitSegments(
                    tuple(k for k, who in first.items() if who == id(unit)),
                    tuple(k for k, who in last.items() if who == id(unit)), tuple(sorted(owned)))
                u += 1
        return plan

    # -- gather, free, reduce --------------------------------------------------------------------

    def acquire_segments(self, segments) -> None:
        """A unit starts using ``segments``: gather those no running unit holds yet."""
        for k in segments:
            self._live[k] += 1
            if self._live[k] == 1:
                self._gather_segment(k)

    def release_segments(self, segments) -> None:
        """A unit is done with ``segments``: free those no other running unit uses."""
        for k in segments:
            self._live[k] -= 1
            if self._live[k] == 0:
                for i in self.layout.segments[k].params:
                    self.layout.params[i].data = None

    def _gather_segment(self, k: int) -> None:
        full = self._gather_slice(self.param_shard, k)
        start = self.layout.segments[k].start
        for i in self.layout.segments[k].params:
            self.layout.params[i].data = self.layout.view(full, i, start)

    def _gather_slice(self, shard, k: int):
        seg = self.layout.segments[k]
        c = seg.size // self.layout.dp
        return self.mesh.dp.allgather(shard[seg.shard_start:seg.shard_start + c])  # (size,)

    def reduce_segment(self, k: int) -> None:
        """Reduce-scatter segment k's gradients into the shard and drop the full ones."""
        seg = self.layout.segments[k]
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
        for k, seg in enumerate(self.layout.segments):
            if any(self.layout.params[i].grad is not None for i in seg.params):
                self.reduce_segment(k)
        self._sync_tp_partial()

    def step(self, lr: float) -> None:
        """Update the shard; the next forward gathers the new parameters."""
        self._update_shard(lr)

    def _param_view(self, flat: int, shard: int, n: int):
        return self.param_shard[shard:shard + n]

    def _grad_view(self, flat: int, shard: int, n: int):
        return self.grad_shard[shard:shard + n]

    def _param_shard(self):
        return self.param_shard

    def _grad_shard(self):
        return self.grad_shard

    def _load_params(self, flat) -> None:
        self.param_shard[...] = self.layout.shard_of(flat)

    def memory(self) -> dict[str, int]:
        return {"params": int(self.param_shard.nbytes), "grads": int(self.grad_shard.nbytes),
                "optimizer": self.optimizer.state_bytes()}


def make_strategy(par, chunks, mesh, **optimizer) -> DataParallelStrategy:
    """This rank's data-parallel strategy for the layout ``par`` (its ZeRO stage and buckets,
    validated with the rest of the configuration); ``optimizer``: name, lr, weight_decay."""
    if par.zero == 3:
        return ZeRO3(chunks, mesh, **optimizer)
    buckets = {"bucket_mb": par.bucket_mb, "microbatches": par.microbatches}
    if par.zero in (1, 2):
        return (ZeRO1 if par.zero == 1 else ZeRO2)(chunks, mesh, **buckets, **optimizer)
    if par.bucket_mb > 0:
        return BucketedDataParallel(chunks, mesh, **buckets, **optimizer)
    return DataParallel(chunks, mesh, **optimizer)
