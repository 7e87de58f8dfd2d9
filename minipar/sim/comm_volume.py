"""Bytes per collective per step, call by call, as ``CommStats`` records them.

Each function below names one place where minipar's parallel code communicates and returns the
collectives it issues there, so the prediction can be compared with a real run exactly and
changed in one place if the implementation does something else. Accounting (``CommStats``):
allreduce bytes = input nbytes; allgather = output nbytes; reduce_scatter = input nbytes;
send = message nbytes; a group of one rank records nothing. The time model
(``minipar.sim.timing``) prices these same lists.

Sources: Megatron-LM (Shoeybi et al. 2019) for the 2 + 2 allreduces per block and the
vocab-parallel embedding and loss; Korthikanti et al. 2022 for sequence parallelism (each
allreduce becomes an allgather and a reduce-scatter of the same volume); ZeRO (Rajbhandari et
al. 2019) for reduce-scatter + allgather of stages 1-2 and the per-unit gathers of stage 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minipar.config import ModelConfig, ParallelConfig
from minipar.sim.costmodel import units


@dataclass(frozen=True)
class Collective:
    """One call: group ("dp", "tp", "pp", "world"), op, and the bytes CommStats records."""

    group: str
    op: str  # allreduce, allgather, reduce_scatter, send, recv
    nbytes: int


def _act(model: ModelConfig, b: int, e: int) -> int:
    """Bytes of one (b, s, h) activation."""
    return b * model.seq_len * model.d_model * e


def block_tp(model: ModelConfig, parallel: ParallelConfig, b: int, e: int,
             backward: bool) -> list[Collective]:
    """One block, one microbatch, one pass: Megatron's g after the attention projection and
    the MLP (f in backward before QKV and MLP up-projection): 2 allreduces of (b, s, h). Under
    sequence parallelism an allgather entering and a reduce-scatter leaving each half, and in
    backward each column-parallel matrix allgathers its cached sequence shard again for its
    weight gradient (Korthikanti et al. 2022, section 4.2.2): 2 more allgathers."""
    if parallel.tp == 1:
        return []
    x = _act(model, b, e)
    if parallel.sequence_parallel:
        regather = [Collective("tp", "allgather", x)] * (2 if backward else 0)
        return [Collective("tp", "allgather", x), Collective("tp", "reduce_scatter", x)] * 2 + \
            regather
    return [Collective("tp", "allreduce", x)] * 2


def embed_tp(model: ModelConfig, parallel: ParallelConfig, b: int, e: int,
             backward: bool) -> list[Collective]:
    """Vocab-parallel embedding: g sums the rows looked up on each rank (allreduce forward);
    under SP a reduce-scatter forward whose backward is an allgather."""
    if parallel.tp == 1:
        return []
    x = _act(model, b, e)
    if parallel.sequence_parallel:
        return [Collective("tp", "allgather" if backward else "reduce_scatter", x)]
    return [] if backward else [Collective("tp", "allreduce", x)]


def head_tp(model: ModelConfig, parallel: ParallelConfig, b: int, e: int,
            backward: bool) -> list[Collective]:
    """LM head and vocab-parallel cross-entropy: f before the head (allreduce backward; under SP
    allgather forward, and in backward the re-gather of the cached shard then reduce-scatter)
    and three (b, s) allreduces forward for the row maximum, the sum of exponentials and the
    target logit."""
    if parallel.tp == 1:
        return []
    x = _act(model, b, e)
    if backward:
        if parallel.sequence_parallel:
            return [Collective("tp", "allgather", x), Collective("tp", "reduce_scatter", x)]
        return [Collective("tp", "allreduce", x)]
    small = [Collective("tp", "allreduce", b * model.seq_len * e)] * 3
    return ([Collective("tp", "allgather", x)] if parallel.sequence_parallel else []) + small


def chunk_tp(model: ModelConfig, parallel: ParallelConfig, stage: int, chunk: int, b: int,
             e: int, backward: bool) -> list[Collective]:
    """All tp collectives of one pass of one microbatch through one local chunk."""
    out: list[Collective] = []
    for unit in units(model, parallel, stage)[chunk]:
        fn = {"embed": embed_tp, "block": block_tp, "head": head_tp}[unit.kind]
        out += fn(model, parallel, b, e, backward)
    return out


def partial_grads_tp(model: ModelConfig, parallel: ParallelConfig, stage: int,
                     e: int) -> list[Collective]:
    """Under SP, LayerNorm, row-parallel bias and position gradients are partial sums over tp:
    one allreduce of all of them, flattened, per step before the dp sync."""
    if parallel.tp == 1 or not parallel.sequence_parallel:
        return []
    n = sum(u.partial for chunk in units(model, parallel, stage) for u in chunk)
    return [Collective("tp", "allreduce", n * e)] if n else []


def step_metrics(parallel: ParallelConfig) -> list[Collective]:
    """The loss and squared gradient norm, two float64 summed over the world once a step."""
    return [Collective("world", "allreduce", 16)] if parallel.world > 1 else []


def _padded(n: int, dp: int) -> int:
    return -(-n // dp) * dp


def dp_sync(model: ModelConfig, parallel: ParallelConfig, stage: int, e: int,
            m: int) -> list[Collective]:
    """Data-parallel gradient sync of one step, for the ZeRO stage of ``parallel``.

    ZeRO-0: allreduce of every gradient (one call; with buckets of ``bucket_mb`` MiB the same
    bytes in ceil(bytes / bucket) calls). ZeRO-1/2: reduce-scatter of the flat gradient buffer
    padded to a multiple of dp, then allgather of the updated flat parameters. ZeRO-3: per
    microbatch an allgather of each unit's parameters before its forward and again before its
    backward, and a reduce-scatter of each unit's gradients after its backward.
    """
    dp = parallel.dp
    if dp == 1:
        return []
    all_units = [u for chunk in units(model, parallel, stage) for u in chunk]
    n = sum(u.params for u in all_units)
    if parallel.zero == 0:
        total = n * e
        calls = 1
        if parallel.bucket_mb > 0:
            calls = max(1, math.ceil(total / (parallel.bucket_mb * 2 ** 20)))
        return [Collective("dp", "allreduce", total // calls)] * (calls - 1) + [
            Collective("dp", "allreduce", total - (total // calls) * (calls - 1))]
    if parallel.zero in (1, 2):
        flat = _padded(n, dp) * e
        return [Collective("dp", "reduce_scatter", flat), Collective("dp", "allgather", flat)]
    out = []
    for _ in range(m):
        for u in all_units:
            flat = _padded(u.params, dp) * e
            out += [Collective("dp", "allgather", flat)] * 2
            out.append(Collective("dp", "reduce_scatter", flat))
    return out


def pp_sends(model: ModelConfig, parallel: ParallelConfig, stage: int, b: int, e: int,
             m: int) -> list[Collective]:
    """Point-to-point traffic of one stage per step: each microbatch's output activation from
    every chunk but the last global one, its input gradient from every chunk but the first,
    and as many receives (CommStats counts both sides). Under SP a message is the rank's
    (b, s/t, h) sequence shard."""
    p, v = parallel.pp, parallel.virtual_stages
    if p == 1:
        return []
    x = _act(model, b, e) // (parallel.tp if parallel.sequence_parallel else 1)
    out = []
    for j in range(v):
        g = j * p + stage
        n = (g < p * v - 1) + (g > 0)  # activation out unless last, gradient out unless first
        out += [Collective("pp", "send", x), Collective("pp", "recv", x)] * (n * m)
    return out


def step_collectives(model: ModelConfig, parallel: ParallelConfig, batch_size: int,
                     dtype_bytes: int, stage: int = 0) -> list[Collective]:
    """Every collective one rank of pipeline stage ``stage`` issues in one training step."""
    dp, m = parallel.dp, parallel.microbatches
    b = batch_size // (dp * m)
    out: list[Collective] = []
    for _ in range(m):
        for j in range(parallel.virtual_stages):
            out += chunk_tp(model, parallel, stage, j, b, dtype_bytes, backward=False)
            out += chunk_tp(model, parallel, stage, j, b, dtype_bytes, backward=True)
    out += pp_sends(model, parallel, stage, b, dtype_bytes, m)
    out += partial_grads_tp(model, parallel, stage, dtype_bytes)
    out += dp_sync(model, parallel, stage, dtype_bytes, m)
    return out + step_metrics(parallel)


def tally(collectives: list[Collective]) -> dict:
    """{group: {op: {"calls": n, "bytes": total}}}, the shape of ``CommStats`` totals."""
    out: dict = {}
    for c in collectives:
        slot = out.setdefault(c.group, {}).setdefault(c.op, {"calls": 0, "bytes": 0})
        slot["calls"] += 1
        slot["bytes"] += c.nbytes
    return out


def predict_comm_bytes(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, batch_size: int,
                       dtype_bytes: int, stage: int = 0) -> dict:
    """Predicted ``CommStats`` of one rank of pipeline stage ``stage`` for one training step.

    ``batch_size`` is the global batch (over all dp replicas); each rank's microbatch is
    batch_size / (dp x microbatches). Returns {group: {op: {"calls": .., "bytes": ..}}}.
    """
    return tally(step_collectives(model_cfg, parallel_cfg, batch_size, dtype_bytes, stage))


__all__ = ["Collective", "block_tp", "embed_tp", "head_tp", "chunk_tp", "partial_grads_tp",
           "dp_sync", "step_metrics", "pp_sends", "step_collectives", "tally", "predict_comm_bytes"]
