"""Data parallelism: every dp rank runs the same model on its slice of the global batch, then the
gradients are summed over the dp group so that every replica takes the serial step.

Why a sum and not an average: each microbatch loss is already divided by the number of scored
tokens in the *global* batch (see ``VocabParallelCrossEntropy``), so the sum over ranks and
microbatches of the gradients is exactly the gradient of the serial mean loss.

Read in this order:

- ``DataParallelStrategy``: what the engine asks of data parallelism, plain or ZeRO
  (``minipar.parallel.zero`` holds stages 1-3).
- ``DataParallel``, the default: gradients live in one flat buffer (each ``Param.grad`` is a
  view into it, ``minipar.parallel.flat``), and after the whole backward ONE allreduce of that
  buffer over dp makes every replica's gradient the serial one.
- The extension, ``BucketedDataParallel`` (``bucket_mb`` > 0): the flat buffer is cut into
  ceil(bytes / bucket) near-equal buckets. Backward produces gradients from the last unit to the
  first, so buckets start from the end of the buffer: as soon as every parameter touching a
  bucket has had its last backward of the step, a non-blocking ``iallreduce_`` starts on it
  while the backward of earlier units goes on; ``sync_grads`` waits for them all. With gradient
  accumulation, buckets start only during the LAST microbatch's backward (one sync per step).
  The same bytes as the plain allreduce, in more calls (PyTorch DDP, Li et al. 2020). Knowing
  which microbatch is the last needs the count (``microbatches``); without it the first step
  counts the backward passes and syncs every bucket in ``sync_grads``, later steps overlap.
  ZeRO-1/2 reuse ``Buckets`` to reduce-scatter each bucket instead (a blocking call: ``Comm``
  has no non-blocking reduce-scatter).

Parameters whose gradient is a partial sum over the tp group (LayerNorm, biases and positions in
sequence-parallel regions, Korthikanti et al. 2022) are allreduced over tp once per step, after
the dp sync (sums over dp and over tp commute).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from minipar import backend
from minipar.nn.module import Hooks, Param
from minipar.nn.optim import local_grad_sq, make_optimizer
from minipar.parallel.flat import FlatLayout, bucket_count

__all__ = ["DataParallelStrategy", "DataParallel", "BucketedDataParallel", "Buckets",
           "allreduce_views", "state_of", "unit_owners", "params_used", "FlatLayout",
           "bucket_count", "trainable_params"]


class DataParallelStrategy(ABC):
    """What the engine asks of data parallelism: one object per rank that owns the gradients
    and optimizer state of the rank's parameters (plain, bucketed, or ZeRO 1/2/3).

    A step: ``zero_grad``; the program's passes (hooks the strategy put on the chunks may start
    syncing during backward); ``sync_grads``; ``grad_sq`` (summed over the world into the
    global norm); ``scale_grads`` (clipping); ``step``. The rest serves checkpoints, tests and
    the banner.
    """

    params: list[Param]  # this rank's (tp-local) parameters, in the chunks' order
    optimizer: object  # its update rule and state (``step_count`` counts the updates)
    microbatches: int | None = None  # backward passes per step, when the strategy counts them

    @abstractmethod
    def zero_grad(self) -> None:
        """Start the step's gradients at zero."""

    @abstractmethod
    def sync_grads(self) -> None:
        """After the passes: make this rank's gradients (or its shard of them) the serial run's
        gradient, summed over dp, and over tp where tp ranks hold partial sums."""

    @abstractmethod
    def grad_sq(self) -> float:
        """This rank's share of the squared global gradient norm; summed over the world, every
        element of the model counts once."""

    @abstractmethod
    def scale_grads(self, factor: float) -> None:
        """Multiply the gradients the next ``step`` applies by ``factor`` (clipping)."""

    @abstractmethod
    def step(self, lr: float) -> None:
        """One optimizer update of this rank's parameters (or its shard of them)."""

    @abstractmethod
    def memory(self) -> dict[str, int]:
        """Bytes this rank keeps across steps: {"params", "grads", "optimizer"}."""

    @abstractmethod
    def local_params(self, grads: bool = False) -> dict:
        """{name: host array}: every tp-local parameter (or gradient), whole over dp (a
        collective over dp when dp ranks hold shards)."""

    @abstractmethod
    def local_optimizer_state(self) -> dict:
        """{param name: {state name: host array}}, tp-local, whole over dp (collective)."""

    @abstractmethod
    def load_local(self, params: dict, optim: dict, optimizer_steps: int) -> None:
        """Take this rank's part of tp-local tensors given in the forms ``local_params`` and
        ``local_optimizer_state`` return (a checkpoint saved by any layout)."""

    @property
    def optimizer_steps(self) -> int:
        """Updates taken so far (AdamW's bias correction counts them)."""
        return self.optimizer.step_count


def trainable_params(chunks) -> list[Param]:
    """The parameters of ``chunks`` that training updates, in the chunks' order: all but the
    frozen ones (fine-tuning, ``--freeze``). A frozen parameter stays outside the strategy: every
    rank holds it whole, as initialised or loaded, with no gradient buffer, no collective and no
    optimizer state. The list may be empty (a pipeline stage that is frozen throughout)."""
    return [p for c in chunks for p in c.params() if not p.frozen]


def params_dtype(chunks):
    """The dtype of the chunks' parameters (frozen ones included, so never an empty list)."""
    return next(p.data.dtype for c in chunks for p in c.params())


def allreduce_views(comm, views: list) -> None:
    """Sum ``views`` over ``comm`` in place: one allreduce of them back to back."""
    flat = backend.xp().concatenate([v.reshape(-1) for v in views])
    comm.allreduce_(flat)
    offset = 0
    for v in views:
        v[...] = flat[offset:offset + v.size].reshape(v.shape)
        offset += v.size


def state_of(optim: dict, name: str, key: str):
    """Optimizer state ``key`` of parameter ``name`` in ``load_local``'s ``optim``."""
    try:
        return optim[name][key]
    except KeyError:
        raise ValueError(f"checkpoint lacks optimizer state {key!r} for {name}") from None


# -- plain data parallelism ----------------------------------------------------------------------

class DataParallel(DataParallelStrategy):
    """Plain data parallelism (ZeRO stage 0): ONE allreduce of the flat gradient after the whole
    backward; every replica keeps the full parameters, gradients and optimizer state."""

    def __init__(self, chunks, mesh, *, optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, grad_dtype: str | None = None, master: bool = False):
        self.params = trainable_params(chunks)
        self.mesh = mesh
        # Mixed precision (minipar.nn.precision): fp32 master weights and state in the
        # optimizer, gradients in grad_dtype (16-bit, or fp32 when microbatches accumulate).
        self.optimizer = make_optimizer(optimizer, self.params, lr, weight_decay, master)
        self.layout = FlatLayout.contiguous(self.params, 1, 0)  # one segment, no padding
        self.flat_grad = backend.xp().zeros(self.layout.total,
                                            dtype=grad_dtype or params_dtype(chunks))
        self._grads = self.layout.bind_grads(self.flat_grad)  # p.grad: views of flat_grad

    def zero_grad(self) -> None:
        self.flat_grad.fill(0)
        self._grads = self.layout.bind_grads(self.flat_grad)

    def sync_grads(self) -> None:
        self.layout.adopt_grads(self._grads, range(len(self.params)))
        self.mesh.dp.allreduce_(self.flat_grad)  # the sum over dp: the serial gradient
        self._sync_tp_partial()

    def _sync_tp_partial(self) -> None:
        partial = [p.grad for p in self.params if p.tp_partial_grad]
        if self.mesh.tp.size > 1 and partial:
            allreduce_views(self.mesh.tp, partial)

    def grad_sq(self) -> float:
        """Replicas hold identical gradients, so only dp rank 0 contributes."""
        return 0.0 if self.mesh.dp_rank else local_grad_sq(self.params, self.mesh.tp_rank)

    def scale_grads(self, factor: float) -> None:
        if self.optimizer.master:  # applied to the fp32 gradient at the step
            self.optimizer.grad_factor *= factor
        else:
            self.flat_grad *= factor

    def step(self, lr: float) -> None:
        self.optimizer.step(lr)

    def memory(self) -> dict[str, int]:
        return {"params": sum(int(p.data.nbytes) for p in self.params),
                "grads": int(self.flat_grad.nbytes), "optimizer": self.optimizer.state_bytes()}

    def local_params(self, grads: bool = False) -> dict:
        return {p.name: backend.to_host(p.grad if grads else p.data) for p in self.params}

    def local_optimizer_state(self) -> dict:
        return {name: {key: backend.to_host(a) for key, a in states.items()}
                for name, states in self.optimizer.state.items()}

    def load_local(self, params: dict, optim: dict, optimizer_steps: int) -> None:
        for p in self.params:
            p.data[...] = backend.from_host(params[p.name])
            for key, arr in self.optimizer.state[p.name].items():
                arr[...] = backend.from_host(state_of(optim, p.name, key))
        self.optimizer.step_count = optimizer_steps


# -- the extension: buckets that start during backward -------------------------------------------

def params_used(unit) -> list:
    """Every Param a unit reads, its own and borrowed ones (a tied head reads the embedding)."""
    found: dict[int, object] = {}
    stack = [unit]
    while stack:
        module = stack.pop(0)
        for value in vars(module).values():
            if isinstance(value, Param):
                found.setdefault(id(value), value)
        stack.extend(module.children())
    return list(found.values())


def unit_owners(chunks, params) -> tuple[list, dict[int, int]]:
    """(units in forward order, {id(param): index of its owner unit}).

    A parameter's owner is the first unit to use it in forward, so the last in backward: its
    gradient is final after the owner's backward (a tied embedding after the embedding's, not
    the head's). Every parameter must be used by exactly one chunk.
    """
    units = [u for c in chunks for u in c.units]
    chunk_of: dict[int, int] = {}
    owner: dict[int, int] = {}
    u = 0
    for ci, chunk in enumerate(chunks):
        for unit in chunk.units:
            for p in params_used(unit):
                if chunk_of.setdefault(id(p), ci) != ci:
                    raise NotImplementedError(f"{p.name} is used by two model chunks; data "
                                              "parallel hooks need each parameter in one chunk")
                owner.setdefault(id(p), u)
            u += 1
    missing = [p.name for p in params if id(p) not in owner]
    if missing:
        raise ValueError(f"parameters used by no unit of the chunks: {missing[:5]}")
    return units, owner


class BackwardHooks(Hooks):
    """Tells a ``Buckets`` strategy when a unit's backward of a microbatch has ended."""

    def __init__(self, strategy: "Buckets"):
        self.strategy = strategy

    def post_backward(self, unit, mb) -> None:
        self.strategy.unit_backward_done(unit, mb)


class Buckets:
    """Starts syncing each bucket (segment) of the flat gradient as soon as the step's backward
    has finished every parameter in it; mixed into bucketed DP and ZeRO-1/2.

    The strategy provides ``params``, ``layout`` (its segments are the buckets), ``_grads``
    (the views ``bind_grads`` returned) and ``_sync_bucket(k)``, the collective on bucket k.
    """

    def _watch(self, chunks, microbatches: int | None, overlap: bool) -> None:
        """With ``overlap``, hook every unit's backward; without, buckets start in sync_grads."""
        self.microbatches = microbatches  # None: learned from the first step's backward passes
        self._unit_index: dict[int, int] = {}  # id(unit) -> its index in forward order
        self._owned: list[list[int]] = []  # unit index -> the parameters it finishes
        if overlap:
            units, owner = unit_owners(chunks, self.params)
            self._unit_index = {id(u): i for i, u in enumerate(units)}
            self._owned = [[] for _ in units]
            for i, p in enumerate(self.layout.params):
                self._owned[owner[id(p)]].append(i)
            for chunk in chunks:
                chunk.hooks = BackwardHooks(self)
        self._new_step()

    def _new_step(self) -> None:
        self._backwards: dict[int, int] = {}  # unit index -> backward passes this step
        self._finished: set[int] = set()  # parameters whose gradient is final
        self._next = len(self.layout.segments) - 1  # buckets start from the end of the buffer

    def unit_backward_done(self, unit, mb) -> None:
        """A unit's backward of microbatch ``mb`` ended: start every bucket it completed."""
        u = self._unit_index[id(unit)]
        self._backwards[u] = self._backwards.get(u, 0) + 1
        if self.microbatches is None or self._backwards[u] != self.microbatches:
            return  # not the last microbatch: its gradients are still accumulating
        self._finished.update(self._owned[u])
        while self._next >= 0 and self._finished.issuperset(
                self.layout.segments[self._next].params):
            self._start_next_bucket()

    def _start_next_bucket(self) -> None:
        k = self._next
        self.layout.adopt_grads(self._grads, self.layout.segments[k].params)
        self._sync_bucket(k)
        self._next -= 1

    def _sync_remaining_buckets(self) -> None:
        """Start every bucket the backward did not (all of them without overlap)."""
        if self.microbatches is None and self._backwards:
            self.microbatches = max(self._backwards.values())
        while self._next >= 0:
            self._start_next_bucket()
        self._new_step()

    def _sync_bucket(self, k: int) -> None:
        raise NotImplementedError


class BucketedDataParallel(Buckets, DataParallel):
    """Data parallelism whose allreduce is cut into buckets of at most ``bucket_mb`` MiB, each
    started, non-blocking, as soon as the backward has finished it (see the module doc)."""

    def __init__(self, chunks, mesh, *, bucket_mb: float, microbatches: int | None = None,
                 **optimizer):
        super().__init__(chunks, mesh, **optimizer)
        n = bucket_count(self.flat_grad.nbytes, bucket_mb, self.flat_grad.size)
        self.layout = FlatLayout.contiguous(self.params, 1, 0, n)  # the same buffer, in n
        self._grads = self.layout.bind_grads(self.flat_grad)
        self._requests: list = []  # the buckets' non-blocking allreduces
        self._watch(chunks, microbatches, overlap=True)

    def zero_grad(self) -> None:
        super().zero_grad()
        self._new_step()

    def _sync_bucket(self, k: int) -> None:
        bucket = self.flat_grad[self.layout.segments[k].span]
        self._requests.append(self.mesh.dp.iallreduce_(bucket))

    def sync_grads(self) -> None:
        self._sync_remaining_buckets()
        for request in self._requests:
            request.wait()
        self._requests.clear()
        self._sync_tp_partial()
