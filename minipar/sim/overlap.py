"""What communication can hide behind compute: ZeRO-3's traffic, unit by unit.

ZeRO-3 (Rajbhandari et al. 2019) gathers each unit's parameters before its forward and again
before its backward, and reduce-scatters its gradients after its backward. With prefetch the
next unit's gather (and the previous unit's reduce-scatter) travel while a unit computes, so a
pass costs, per unit, the longer of the two (``overlapped``); nothing hides the first gather or
the last reduce-scatter. The seconds of each collective come from the ring model of
``minipar.sim.timing`` (``comm_time``), passed in so that this module stays below it.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipar.config import ModelConfig, ParallelConfig
from minipar.sim import comm_volume as cv
from minipar.sim.costmodel import Workload, dtype_bytes, units


@dataclass
class UnitCost:
    """Seconds of one microbatch through one unit: its passes (compute and the tensor-parallel
    collectives they wait for) and its ZeRO-3 traffic (0 without ZeRO-3)."""

    fwd: float = 0.0
    bwd_input: float = 0.0  # input-gradient kernels (+ recomputation) and their tp comm
    bwd_weight: float = 0.0  # weight-gradient GEMMs (the zero-bubble W pass)
    gather_fwd: float = 0.0  # ZeRO-3 allgather of the unit's parameters before its forward
    gather_bwd: float = 0.0  # ... before its backward (twice when recomputed, see chunk_costs)
    scatter: float = 0.0  # ZeRO-3 reduce-scatter of its gradients after its backward


def overlapped(passes: list[float], before: list[float], after: list[float]) -> float:
    """Seconds of a pass over units 0..n-1 in order when communication overlaps compute.

    Unit i's ``before`` traffic (its parameter gather) must finish before it starts; its
    ``after`` traffic (its gradient reduce-scatter) starts when it ends. With prefetch the
    traffic of unit i+1's gather and unit i-1's reduce-scatter share the link while unit i
    computes, so each phase costs max(compute, traffic); what has nothing to hide behind is
    exposed: the first gather and the last reduce-scatter (ZeRO, Rajbhandari et al. 2019,
    section 7; the prefetch of DeepSpeed's and FSDP's implementations, Zhao et al. 2023).
    Without traffic this is the plain sum of the passes.
    """
    n = len(passes)
    t = before[0] if n else 0.0
    for i in range(n):
        nxt = before[i + 1] if i + 1 < n else 0.0
        prev = after[i - 1] if i > 0 else 0.0
        t += max(passes[i], nxt + prev)
    return t + (after[-1] if n else 0.0)


def zero3_traffic(u, recomputed: bool, e: int, comm_time,
                  parallel: ParallelConfig) -> tuple[float, float, float]:
    """(gather before forward, gathers before backward, reduce-scatter after backward) of one
    unit under ZeRO-3, in seconds. A recomputed unit gathers twice in backward: ZeRO-3 frees a
    unit's parameters after each forward, the recomputation is a forward, and the backward
    that follows gathers them again (the hooks of DeepSpeed's ZeRO-3, which PTD-P table 2
    ran; minipar itself does not recompute). ``comm_time(collectives)`` prices a list."""
    shards = parallel.dp * parallel.cp  # the gradient group: dp x cp ("dpcp") under cp
    group = "dp" if parallel.cp == 1 else "dpcp"
    flat = -(-u.params // shards) * shards * e  # padded to the shards
    gather = comm_time([cv.Collective(group, "allgather", flat)])
    scatter = comm_time([cv.Collective(group, "reduce_scatter", flat)])
    return gather, gather * (2 if recomputed else 1), scatter


def zero3_recompute_bytes(model: ModelConfig, parallel: ParallelConfig, work: Workload,
                          stage: int) -> int:
    """Bytes of the extra gathers of recomputed blocks per step (see ``zero3_traffic``): not
    in ``comm_volume.dp_sync``, which counts what minipar's own ZeRO-3 moves."""
    shards = parallel.dp * parallel.cp
    if parallel.zero < 3 or shards == 1 or work.recompute != "full":
        return 0
    e, m = dtype_bytes(work.dtype), work.microbatches(parallel.dp)
    return m * sum(-(-u.params // shards) * shards * e
                   for chunk in units(model, parallel, stage) for u in chunk
                   if u.kind == "block")


__all__ = ["UnitCost", "overlapped", "zero3_traffic", "zero3_recompute_bytes"]
