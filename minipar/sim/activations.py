"""Activation memory measured: the bytes a layer's caches keep for its backward pass.

``activation_breakdown`` reads them from any module, sub-module by sub-module, each buffer once;
``measure_block_activations`` builds one ``Block`` on an in-process tp world and measures every
rank. The formula they are checked against, tensor by tensor, is
``minipar.sim.costmodel.block_activation_terms`` (Korthikanti et al. 2022, table 2, with
minipar's choices: no dropout, LayerNorm's 1/std kept, e bytes per value).
"""

from __future__ import annotations

from minipar.config import ModelConfig
from minipar.nn.memory import activation_breakdown, activation_bytes  # the one meter


def measure_block_activations(cfg: ModelConfig, tp: int, sequence_parallel: bool, rows: int,
                              dtype: str = "float64", seed: int = 0, recompute: str = "none",
                              attention: str = "plain") -> list[dict[str, int]]:
    """Build one ``Block`` on an in-process tp world, run its forward on random input, and
    return every rank's ``activation_breakdown`` (rank order). Under sequence parallelism each
    rank is given its T/tp tokens, as the previous layer's reduce-scatter would leave them.
    ``recompute`` and ``attention`` choose what the block keeps (``minipar.models.blocks``);
    under full recomputation the block itself holds its input, reported as "input"."""
    import numpy

    from minipar import backend
    from minipar.dist.comm import run_threads
    from minipar.models.blocks import Block
    from minipar.nn.module import BuildContext

    full = numpy.random.default_rng(seed).normal(size=(rows, cfg.seq_len, cfg.d_model))

    def rank(tp_comm):
        ctx = BuildContext(seed, dtype, tp_comm, sequence_parallel,
                           attention=attention, recompute=recompute)
        block = Block(ctx, "blocks.0", cfg)
        t = cfg.seq_len // tp if sequence_parallel else cfg.seq_len
        lo = tp_comm.rank * t if sequence_parallel else 0
        x = backend.from_host(numpy.ascontiguousarray(full[:, lo:lo + t].astype(dtype)))
        block.forward(x, mb=0)
        return {k or "input": v for k, v in activation_breakdown(block).items()}

    return run_threads(rank, tp)


__all__ = ["activation_breakdown", "activation_bytes", "measure_block_activations"]
