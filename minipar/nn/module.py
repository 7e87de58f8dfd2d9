"""Parameters and modules: the state around the pure kernels of ``functional``.

A ``Module`` keeps one cache per microbatch (``forward(x, mb)`` stores it, ``backward(dy, mb)``
pops it) and *adds* into ``Param.grad``; zeroing is explicit. That is all gradient accumulation
and pipeline microbatching need: no special cases.

Initialisation does not depend on the layout: every full weight is drawn from the run's seed and
the parameter's name, then cut to this rank's shard. A run on 8 ranks starts from exactly the
weights of the serial run, so the two can be compared number for number.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy

from minipar import backend
from minipar.nn import functional as F


@dataclass(frozen=True)
class Sharding:
    """How a rank's local tensor is cut from the full one.

    The full tensor is optionally padded along ``axis`` to ``padded`` (a vocabulary that the
    tensor-parallel size does not divide), reshaped to ``view`` (a fused [Q|K|V] weight is split
    per head, not as one block), and cut into ``parts`` equal pieces along ``axis`` of that view.
    """

    axis: int
    parts: int
    index: int
    view: tuple | None = None
    padded: int | None = None

    def local(self, full):
        """The piece of ``full`` (host or device array) that this rank holds."""
        xp = numpy if isinstance(full, numpy.ndarray) else backend.xp()
        a = full
        if self.padded is not None and self.padded != full.shape[self.axis]:
            pad = [(0, 0)] * full.ndim
            pad[self.axis] = (0, self.padded - full.shape[self.axis])
            a = xp.pad(a, pad)
        shape = a.shape
        if self.view is not None:
            a = a.reshape(self.view)
        n = a.shape[self.axis] // self.parts
        a = xp.take(a, xp.arange(self.index * n, (self.index + 1) * n), axis=self.axis)
        if self.view is not None:
            # A view is only used to split the last axis in blocks ([Q|K|V] per head), so the
            # local tensor is the full one with its last axis divided by ``parts``.
            a = a.reshape(*shape[:-1], shape[-1] // self.parts)
        return xp.ascontiguousarray(a)

    def full(self, pieces: list, full_shape: tuple):
        """Reassemble the full tensor from every rank's piece (in rank order), padding removed."""
        xp = numpy if isinstance(pieces[0], numpy.ndarray) else backend.xp()
        if self.view is not None:
            local_view = list(self.view)
            local_view[self.axis] //= self.parts
            pieces = [p.reshape(local_view) for p in pieces]
        a = xp.concatenate(pieces, axis=self.axis)
        if self.view is not None:
            padded_shape = list(full_shape)
            if self.padded is not None:
                padded_shape[self.axis] = self.padded
            a = a.reshape(padded_shape)
        if self.padded is not None:
            a = xp.take(a, xp.arange(full_shape[self.axis]), axis=self.axis)
        return a


class Param:
    """A named weight: local data, accumulated gradient, and how it relates to the full tensor.

    ``sharding`` is None for a tensor every tp rank holds whole. ``tp_partial_grad`` marks a
    replicated parameter whose gradient is a partial sum over the tp group (LayerNorm and biases
    in sequence-parallel regions), which must be allreduced over tp before the optimizer step.
    """

    def __init__(self, name: str, data, sharding: Sharding | None = None,
                 full_shape: tuple | None = None, decay: bool = True):
        self.name = name
        self.data = data
        self.grad = None
        self.sharding = sharding
        self.full_shape = tuple(full_shape if full_shape is not None else data.shape)
        self.decay = decay
        self.tp_partial_grad = False
        self.frozen = False  # fine-tuning (--freeze): never updated, its gradient is dropped

    def accumulate(self, g) -> None:
        """Add a gradient contribution; kernels return fresh arrays, so the first is kept as is.
        A frozen parameter drops it: nothing syncs, clips or applies it."""
        if self.frozen:
            return
        if self.grad is None:
            self.grad = g
        else:
            self.grad += g

    def __repr__(self) -> str:
        sh = self.sharding
        shard = "" if sh is None else f", shard {sh.index}/{sh.parts}"
        return f"Param({self.name}, {tuple(self.data.shape)}{shard})"


def matches_prefix(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` lies under the dotted ``prefix``: "blocks.0" matches
    "blocks.0.attn.qkv.w", not "blocks.01.ln1.g" (how ``--freeze`` names parameters)."""
    return name == prefix or name.startswith(prefix + ".")


def init_full(seed: int, name: str, shape: tuple, std: float | str, dtype) -> numpy.ndarray:
    """The full tensor for ``name``: drawn from (seed, name) alone, never from the layout."""
    if std == "ones":
        return numpy.ones(shape, dtype=dtype)
    if std == "zeros":
        return numpy.zeros(shape, dtype=dtype)
    rng = numpy.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.normal(0.0, float(std), size=shape).astype(dtype)


def make_param(ctx, name: str, shape: tuple, std, sharding: Sharding | None = None,
               decay: bool = True) -> Param:
    """Draw the full tensor, keep this rank's shard, place it on the backend's device."""
    full = init_full(ctx.seed, name, shape, std, ctx.dtype)
    local = full if sharding is None else sharding.local(full)
    return Param(name, backend.from_host(numpy.ascontiguousarray(local)), sharding, shape, decay)


class Module:
    """Base class: finds its Params and child Modules in attribute order; caches per microbatch."""

    def __init__(self):
        self._cache: dict = {}

    def children(self) -> list["Module"]:
        """Direct sub-modules, each once, in attribute order (lists of modules included)."""
        out: dict[int, Module] = {}
        for value in vars(self).values():
            items = value if isinstance(value, (list, tuple)) else [value]
            for v in items:
                if isinstance(v, Module):
                    out.setdefault(id(v), v)
        return list(out.values())

    def params(self) -> list[Param]:
        """Every parameter of this module and its children, each once, in a fixed order."""
        found: dict[int, Param] = {}
        for v in vars(self).values():
            if isinstance(v, Param):
                found.setdefault(id(v), v)
        for child in self.children():
            for p in child.params():
                found.setdefault(id(p), p)
        return list(found.values())

    def zero_grad(self) -> None:
        for p in self.params():
            p.grad = None

    def save(self, mb, cache) -> None:
        if mb in self._cache:
            raise RuntimeError(f"{type(self).__name__}: microbatch {mb} already has a cache "
                               "(forward called twice without backward)")
        self._cache[mb] = cache

    def peek(self, mb):
        """What ``save`` kept for microbatch ``mb``, left in place for its ``pop``."""
        return self._cache[mb]

    def pop(self, mb):
        try:
            return self._cache.pop(mb)
        except KeyError:
            raise RuntimeError(f"{type(self).__name__}: backward for microbatch {mb} without its "
                               "forward") from None


class Hooks:
    """Called around every unit; data parallelism overrides these (ZeRO-3, overlap)."""

    def pre_forward(self, unit: Module, mb) -> None: ...
    def post_forward(self, unit: Module, mb) -> None: ...
    def pre_backward(self, unit: Module, mb) -> None: ...
    def post_backward(self, unit: Module, mb) -> None: ...


def walk(module: Module):
    """``module`` and every module below it, depth first, in attribute order."""
    yield module
    for child in module.children():
        yield from walk(child)


class LayerNorm(Module):
    """LayerNorm with gain and bias; replicated on every tp rank."""

    def __init__(self, ctx, name: str, width: int):
        super().__init__()
        self.g = make_param(ctx, f"{name}.g", (width,), "ones", decay=False)
        self.b = make_param(ctx, f"{name}.b", (width,), "zeros", decay=False)

    def forward(self, x, mb=0):
        y, (xhat, rstd, _) = F.layernorm_fwd(x, self.g.data, self.b.data)
        # Keep activations only: the gain is read again at backward time, so a ZeRO-3 run can
        # free the gathered parameters between a unit's forward and backward.
        self.save(mb, (xhat, rstd))
        return y

    def backward(self, dy, mb=0):
        xhat, rstd = self.pop(mb)
        dx, dg, db = F.layernorm_bwd(dy, (xhat, rstd, self.g.data))
        self.g.accumulate(dg)
        self.b.accumulate(db)
        return dx


@dataclass(frozen=True)
class BuildContext:
    """What a layer needs to build itself: seed and dtype for init, the tp group it is split over.

    Communicators are passed, never global: the in-process world runs every rank in one
    interpreter, so module-level parallel state would be shared by all of them.
    """

    seed: int
    dtype: str
    tp: object  # minipar.dist.comm.Comm of the tensor-parallel group (size 1 when serial)
    sequence_parallel: bool = False
    dropout: object = None  # minipar.nn.dropout.MaskSource of this rank; None: no dropout
    attention: str = "plain"  # "plain" (functional) or "blockwise" (minipar.nn.blockwise)
    recompute: str = "none"  # "none", "selective" or "full" (minipar.models.blocks)
