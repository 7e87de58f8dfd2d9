"""The tensor-parallel group's traffic of one training step, call by call, in closed form.

Megatron-LM (Shoeybi et al. 2019): each block costs 2 allreduces of (b, s, h) forward (g after
the attention output and the MLP) and 2 backward (f before the QKV and first MLP matrices); the
vocab-parallel embedding adds one allreduce forward (its g), the LM head one backward (its f),
and the vocab-parallel cross-entropy three allreduces of (b, s) forward: row maximum, sum of
exponentials, target logit.

Sequence parallelism (Korthikanti et al. 2022): every g becomes a reduce-scatter along the
sequence (backward: allgather) and every f an allgather (backward: reduce-scatter), each
recording b s h e bytes, the same wire volume as the allreduce it replaces. A column-parallel
matrix (QKV, first MLP, LM head) caches only its sequence shard and allgathers it again in
backward (section 4.2.2), one more allgather per such matrix; and the replicated parameters
that see only this rank's tokens (LayerNorms, row-parallel biases, learned positions) have
partial gradients, summed by one allreduce of all of them, flattened, before the dp sync
(``minipar.parallel.data.sync_tp_partial_grads``).

Bytes are as ``CommStats`` records them (allreduce: input; allgather: output; reduce_scatter:
input; see ``minipar.dist.comm``); a tp group of one records nothing.
"""

from __future__ import annotations

from minipar.config import ModelConfig, ParallelConfig


def _add(out: dict, op: str, calls: int, nbytes: int) -> None:
    if calls:
        slot = out.setdefault(op, {"calls": 0, "bytes": 0})
        slot["calls"] += calls
        slot["bytes"] += calls * nbytes


def stage_units(cfg: ModelConfig, par: ParallelConfig, stage: int) -> tuple[bool, int, bool]:
    """(holds the embedding, number of blocks, holds the head) for pipeline rank ``stage``: every
    rank holds n_layers / pp blocks over its chunks; the first rank the embedding, the last the
    head (also with interleaving: global chunk 0 and the last chunk sit on those ranks)."""
    return stage == 0, cfg.n_layers // par.pp, stage == par.pp - 1


def tp_partial_grad_elements(cfg: ModelConfig, par: ParallelConfig, stage: int = 0) -> int:
    """Elements whose gradient is a partial sum over tp on ``stage`` (0 without SP): per block
    two LayerNorms (4h) and two row-parallel biases (2h), the final LayerNorm (2h), and the
    learned position table (s h)."""
    if not par.sequence_parallel or par.tp == 1:
        return 0
    first, blocks, last = stage_units(cfg, par, stage)
    h = cfg.d_model
    return (blocks * 6 * h + (2 * h if last else 0)
            + (cfg.seq_len * h if first and cfg.pos == "learned" else 0))


def tp_comm_per_step(cfg: ModelConfig, par: ParallelConfig, batch_rows_per_microbatch: int,
                     microbatches: int, dtype_bytes: int, stage: int = 0,
                     partial_grad_elements: int | None = None) -> dict:
    """What one rank of pipeline stage ``stage`` records in its tp group in one training step.

    Returns ``{op: {"calls": n, "bytes": total}}`` with only the ops that occur ({} when
    tp == 1). ``batch_rows_per_microbatch`` is b, the sequences in one microbatch on this rank.

    The tp-partial gradients are summed by one allreduce per step. With plain data parallelism
    (ZeRO 0, ``DataParallel.sync_grads``) it holds all of them, ``tp_partial_grad_elements``;
    ZeRO 1-3 sum only the part inside this rank's dp shard, a count that depends on their flat
    layout and the dp rank: pass it as ``partial_grad_elements`` (0 means no call);
    ``minipar.sim.comm_volume.partial_elements`` computes it with the runtime's ``FlatLayout``.
    """
    out: dict = {}
    if par.tp == 1:
        return out
    m, e = microbatches, dtype_bytes
    act = batch_rows_per_microbatch * cfg.seq_len * cfg.d_model * e  # one (b, s, h)
    tokens = batch_rows_per_microbatch * cfg.seq_len * e  # one (b, s)
    first, blocks, last = stage_units(cfg, par, stage)
    if par.sequence_parallel:
        # forward: embedding reduce-scatter; per block 2 x (allgather in, reduce-scatter out);
        # head allgather in. backward: per block 2 x (allgather of dy for the row-parallel
        # matrix, allgather of the cached shard, reduce-scatter of dx); head allgather of the
        # shard and reduce-scatter of dx; embedding allgather of dy.
        _add(out, "allgather", m * (blocks * 6 + (2 if last else 0) + (1 if first else 0)), act)
        _add(out, "reduce_scatter", m * (blocks * 4 + (1 if last else 0) + (1 if first else 0)),
             act)
    else:
        # forward: embedding g, 2 g per block; backward: 2 f per block, the head's f.
        _add(out, "allreduce", m * (blocks * 4 + (1 if last else 0) + (1 if first else 0)), act)
    if last:
        _add(out, "allreduce", m * 3, tokens)  # cross-entropy: max, sum of exp, target logit
    partial = (tp_partial_grad_elements(cfg, par, stage) if partial_grad_elements is None
               else partial_grad_elements)
    _add(out, "allreduce", 1 if partial else 0, partial * e)
    return out


__all__ = ["stage_units", "tp_partial_grad_elements", "tp_comm_per_step"]
