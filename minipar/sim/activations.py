"""Activation memory measured: the bytes a layer's caches keep for its backward pass.

``activation_breakdown`` reads them from any module, sub-module by sub-module, each buffer once;
``measure_block_activations`` builds one ``Block`` on an in-process tp world and measures every
rank. The formula they are checked against, tensor by tensor, is
``minipar.sim.costmodel.block_activation_terms`` (Korthikanti et al. 2022, table 2, with
minipar's choices: no dropout, LayerNorm's 1/std kept, e bytes per value).
"""

from __future__ import annotations

from minipar.config import ModelConfig
from minipar.nn.module import Module, Param, arrays_in, held, owner, unique_bytes


def _walk(module: Module, path: str = ""):
    yield path, module
    for name, value in vars(module).items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, v in enumerate(items):
            if isinstance(v, Module):
                sub = name if v is value else f"{name}.{i}"
                yield from _walk(v, f"{path}.{sub}" if path else sub)


def activation_breakdown(module: Module) -> dict[str, int]:
    """Bytes held for backward, by sub-module path ("" is ``module`` itself), in walk order.

    Every buffer is counted once, at the first module that holds it, by the array that owns
    its memory (the Q, K and V head views are one [Q|K|V] buffer). Parameter storage is not
    activation memory and is left out (a linear's kernel cache names its weight). Both module
    caches and deferred weight-gradient inputs (zero-bubble W passes) count.
    """
    walked = list(_walk(module))
    params = {id(owner(v.data)) for _, m in walked for v in vars(m).values()
              if isinstance(v, Param)}
    seen: set[int] = set()
    out: dict[str, int] = {}
    for path, m in walked:
        total = unique_bytes(arrays_in(held(m)), exclude=params, seen=seen)
        if total:
            out[path] = total
    return out


def activation_bytes(module: Module) -> int:
    """Unique bytes ``module`` and its children keep for backward (see ``activation_breakdown``)."""
    return sum(activation_breakdown(module).values())


def measure_block_activations(cfg: ModelConfig, tp: int, sequence_parallel: bool, rows: int,
                              dtype: str = "float64", seed: int = 0) -> list[dict[str, int]]:
    """Build one ``Block`` on an in-process tp world, run its forward on random input, and
    return every rank's ``activation_breakdown`` (rank order). Under sequence parallelism each
    rank is given its T/tp tokens, as the previous layer's reduce-scatter would leave them."""
    import numpy

    from minipar import backend
    from minipar.dist.comm import run_threads
    from minipar.models.blocks import Block
    from minipar.nn.module import BuildContext

    full = numpy.random.default_rng(seed).normal(size=(rows, cfg.seq_len, cfg.d_model))

    def rank(tp_comm):
        block = Block(BuildContext(seed, dtype, tp_comm, sequence_parallel), "blocks.0", cfg)
        t = cfg.seq_len // tp if sequence_parallel else cfg.seq_len
        lo = tp_comm.rank * t if sequence_parallel else 0
        x = backend.from_host(numpy.ascontiguousarray(full[:, lo:lo + t].astype(dtype)))
        block.forward(x, mb=0)
        return activation_breakdown(block)

    return run_threads(rank, tp)


__all__ = ["activation_breakdown", "activation_bytes", "measure_block_activations"]
