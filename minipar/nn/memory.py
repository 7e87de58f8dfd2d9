"""Activation memory, measured: the bytes a model keeps alive for its pending backward passes.

The one meter of the project. The executor samples it after every pass (the peak per pipeline
stage, compared with the program checker's ``peak_live``), the tests and the lessons read it per
layer (``activation_breakdown``, compared with Korthikanti et al. 2022's terms in
``minipar.sim.activations``).

What a module keeps for backward is its caches (``Module.save``, one per microbatch) and the
inputs of deferred weight-gradient passes (zero bubble's W, Qi et al. 2023); ``held`` is the one
place that knows where those live. A buffer counts once, by the array that owns its memory (the
Q, K and V head views are one [Q|K|V] buffer), and parameter storage is left out: a linear's
kernel cache may name its weight, and a weight is not activation memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from minipar.nn.module import Module, Param, walk

EVAL = "_eval"  # the microbatch key of evaluation passes, which no backward pass awaits


# -- what a module holds ---------------------------------------------------------------------

def held(module: Module) -> list[tuple[object, object, bool]]:
    """(microbatch, what is kept, is a cache) for everything ``module`` itself keeps for
    backward: its caches, then the (dy, input) pairs its deferred weight-gradient passes wait
    with (a cache lives until the input-gradient pass, a deferred input until the W pass)."""
    deferred = module.__dict__.get("_pending", {})  # see parallel.deferral
    return ([(mb, cache, True) for mb, cache in module._cache.items()]
            + [(mb, kept, False) for mb, kept in deferred.items()])


def owner(a):
    """The array that owns ``a``'s memory (``a`` itself unless it is a view)."""
    while getattr(a, "base", None) is not None:
        a = a.base
    return a


def arrays_in(obj) -> Iterator:
    """Every array inside nested tuples and lists."""
    if hasattr(obj, "nbytes") and hasattr(obj, "dtype"):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from arrays_in(o)


def unique_bytes(arrays: Iterable, exclude=frozenset(), seen: set | None = None) -> int:
    """Bytes of the distinct memory owners of ``arrays``, skipping owners whose id is in
    ``exclude``; ``seen`` carries the owners already counted across calls."""
    seen = set() if seen is None else seen
    total = 0
    for a in arrays:
        o = owner(a)
        if id(o) in exclude or id(o) in seen:
            continue
        seen.add(id(o))
        total += int(o.nbytes)
    return total


def _parameter_storage(modules: Iterable[Module]) -> set[int]:
    """Ids of the arrays that hold the modules' parameters, read now: ZeRO-3 swaps them in."""
    return {id(owner(v.data)) for m in modules for v in vars(m).values() if isinstance(v, Param)}


# -- the meter -------------------------------------------------------------------------------

def named_modules(module: Module, path: str = "") -> Iterator[tuple[str, Module]]:
    """(path, module) for ``module`` ("") and every module below it, depth first, in attribute
    order; a list's items are ``name.i`` ("blocks.0.attn.qkv")."""
    yield path, module
    for name, value in vars(module).items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, v in enumerate(items):
            if isinstance(v, Module):
                sub = name if v is value else f"{name}.{i}"
                yield from named_modules(v, f"{path}.{sub}" if path else sub)


def activation_breakdown(module: Module) -> dict[str, int]:
    """Bytes held for backward, by sub-module path ("" is ``module`` itself), in walk order;
    a buffer held by several modules counts at the first. Paths holding nothing are left out."""
    named = list(named_modules(module))
    params = _parameter_storage(m for _, m in named)
    seen: set[int] = set()
    out: dict[str, int] = {}
    for path, m in named:
        total = unique_bytes(arrays_in([kept for _, kept, _ in held(m)]), params, seen)
        if total:
            out[path] = total
    return out


def activation_bytes(*modules: Module) -> int:
    """Bytes ``modules`` and everything below them keep for backward, each buffer once (the sum
    of ``activation_breakdown`` for one module; a pipeline stage passes all its chunks)."""
    every = [m for root in modules for m in walk(root)]
    params = _parameter_storage(every)
    return unique_bytes(arrays_in([kept for m in every for _, kept, _ in held(m)]), params)


def live_microbatches(module: Module) -> int:
    """The most microbatches any one module below ``module`` holds caches for."""
    return max(len(m._cache) for m in walk(module))


def live_pairs(chunks: list[Module]) -> tuple[set, set]:
    """(pairs holding anything, pairs holding caches) as sets of (microbatch, local chunk).

    A pair holding caches has the whole activation stack of its microbatch in that chunk; one
    holding only deferred weight-gradient inputs has had its input-gradient pass already.
    """
    live, full = set(), set()
    for j, chunk in enumerate(chunks):
        for m in walk(chunk):
            for mb, _, is_cache in held(m):
                if mb == EVAL:
                    continue
                live.add((mb, j))
                if is_cache:
                    full.add((mb, j))
    return live, full


@dataclass(frozen=True)
class MemorySample:
    """What a pipeline stage holds right after one pass: bytes kept alive and live pairs."""

    label: str  # the pass, as the program prints it (F3, B2.1, W0, ...)
    bytes: int
    live: int  # (mb, chunk) pairs holding caches or deferred weight-gradient inputs
    live_full: int  # pairs whose input-gradient pass has not run (the whole activation stack)


def sample(chunks: list[Module], label: str) -> MemorySample:
    """Measure what a stage's chunks hold now (the executor calls this after every pass)."""
    live, full = live_pairs(chunks)
    return MemorySample(label, activation_bytes(*chunks), len(live), len(full))


__all__ = ["held", "owner", "arrays_in", "unique_bytes", "named_modules", "activation_breakdown",
           "activation_bytes", "live_microbatches", "live_pairs", "MemorySample", "sample"]
