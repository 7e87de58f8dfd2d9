"""Bytes per collective per step, call by call, as ``CommStats`` records them.

Each function below names one place where minipar's parallel code communicates and returns the
collectives it issues there, so the prediction can be compared with a real run exactly and
changed in one place if the implementation does something else. This is the only statement of
minipar's traffic: the tensor-, data- and pipeline-parallel tests and lessons 5 and 6 compare
``CommStats`` with ``predict_comm_bytes`` (its "tp" entry is the tensor-parallel traffic).
Accounting (``CommStats``): allreduce bytes = input nbytes; allgather = output nbytes;
reduce_scatter = input nbytes; send = message nbytes; a group of one rank records nothing. The
time model (``minipar.sim.timing``) prices these same lists.

The data-parallel part does not re-derive the runtime's buffers: ``param_specs`` lists the
parameters a rank holds (name, tp-local shape, owner unit, tp-partial gradient) in the order
the engine builds them, and the runtime's own ``FlatLayout`` and ``bucket_count``
(``minipar.parallel.data``) lay them out, so buckets, ZeRO padding, ZeRO-3's per-unit groups
and which tp-partial gradients fall in a dp rank's shard come from the code that runs. Only
shapes are used: no weight is allocated, so a 175B-parameter layout costs a list of specs.

Sources: Megatron-LM (Shoeybi et al. 2019) for the 2 + 2 allreduces per block and the
vocab-parallel embedding and loss; Korthikanti et al. 2022 for sequence parallelism (each
allreduce becomes an allgather and a reduce-scatter of the same volume); ZeRO (Rajbhandari et
al. 2019) for reduce-scatter + allgather of stages 1-2 and the per-unit gathers of stage 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy
from functools import lru_cache
from math import prod

from minipar.config import ModelConfig, ParallelConfig
from minipar.models.gpt import chunk_specs
from minipar.nn.precision import policy
from minipar.parallel.flat import FlatLayout, bucket_count
from minipar.parallel.tensor import padded_vocab
from minipar.sim.costmodel import units


@dataclass(frozen=True)
class Collective:
    """One call: group ("dp", "tp", "pp", "world"), op, and the bytes CommStats records."""

    group: str
    op: str  # allreduce, allgather, reduce_scatter, send, recv
    nbytes: int


# -- the parameters one rank holds, as the engine builds them -----------------------------------

@dataclass(frozen=True)
class ParamSpec:
    """A parameter as one tp rank holds it, without its data.

    ``unit`` is the index, in forward order over this rank's chunks, of the unit that owns it
    (uses it first in forward; ``minipar.parallel.data.unit_owners``). ``FlatLayout`` reads
    ``p.data.size`` and ``p.data.shape``, so a spec stands in for its own data.
    """

    name: str
    shape: tuple
    unit: int
    tp_partial_grad: bool = False

    @property
    def size(self) -> int:
        return prod(self.shape)

    @property
    def data(self) -> "ParamSpec":
        return self


def _block_specs(i: int, h: int, f: int, t: int, sp: bool, unit: int) -> list[ParamSpec]:
    """``minipar.models.blocks.Block``: ln1, attention (QKV column-, projection row-parallel), ln2,
    MLP (fc column-, projection row-parallel). Under SP the LayerNorms and the row-parallel
    biases see only this rank's tokens: partial gradients."""
    n = f"blocks.{i}"
    return [ParamSpec(name, shape, unit, partial) for name, shape, partial in (
        (f"{n}.ln1.g", (h,), sp), (f"{n}.ln1.b", (h,), sp),
        (f"{n}.attn.qkv.w", (h, 3 * h // t), False), (f"{n}.attn.qkv.b", (3 * h // t,), False),
        (f"{n}.attn.proj.w", (h // t, h), False), (f"{n}.attn.proj.b", (h,), sp),
        (f"{n}.ln2.g", (h,), sp), (f"{n}.ln2.b", (h,), sp),
        (f"{n}.mlp.fc.w", (h, f // t), False), (f"{n}.mlp.fc.b", (f // t,), False),
        (f"{n}.mlp.proj.w", (f // t, h), False), (f"{n}.mlp.proj.b", (h,), sp))]


def param_specs(model: ModelConfig, parallel: ParallelConfig, stage: int) -> list[ParamSpec]:
    """Every parameter a rank of pipeline stage ``stage`` holds, in ``Engine.params`` order
    (each chunk's ``Module.params()``: a module's own Params, then its children's).

    Chunks are ``minipar.models.gpt.chunk_specs``; the embedding lists its positions before the
    vocab-parallel table (its own Param before its child's), and the head's matrix is the
    embedding's, transposed, when the weights are tied inside one chunk. ``tests`` check this
    list against the parameters of the built model.
    """
    h, f, t, sp = model.d_model, model.ffn, parallel.tp, parallel.sequence_parallel
    vp = padded_vocab(model.vocab_size, t)
    out: list[ParamSpec] = []
    unit = 0
    for spec in chunk_specs(model, parallel.pp, parallel.virtual_stages, stage,
                            parallel.partition):
        if spec.is_first:
            if model.pos == "learned":
                out.append(ParamSpec("pos", (model.seq_len, h), unit, sp))
            out.append(ParamSpec("embed.w", (vp // t, h), unit))
            unit += 1
        for i in range(spec.first_layer, spec.first_layer + spec.n_layers):
            out += _block_specs(i, h, f, t, sp, unit)
            unit += 1
        if spec.is_last:
            out += [ParamSpec("ln_f.g", (h,), unit, sp), ParamSpec("ln_f.b", (h,), unit, sp)]
            if not (model.tie_weights and spec.is_first):
                out.append(ParamSpec("head.w", (h, vp // t), unit))
            unit += 1
    return out


@lru_cache(maxsize=256)
def dp_layout(model: ModelConfig, parallel: ParallelConfig, stage: int, dp_rank: int,
              e: int) -> FlatLayout:
    """The flat buffer the dp strategy of ``parallel.zero`` builds on this rank, by the
    runtime's own rules (``BucketedDataParallel``, ``ZeRO1`` and ``ZeRO3`` construct them):
    stages 0-2 one contiguous buffer cut into ``bucket_count`` segments (padded to a multiple of
    dp when sharded), stage 3 one padded segment per unit that owns parameters."""
    specs = param_specs(model, parallel, stage)
    dp = parallel.dp
    if parallel.zero == 3:
        groups: dict[int, list] = {}
        for s in specs:
            groups.setdefault(s.unit, []).append(s)
        return FlatLayout.segmented([groups[u] for u in sorted(groups)], dp, dp_rank)
    n = sum(s.size for s in specs)
    sharded = parallel.zero > 0
    padded = -(-n // dp) * dp if sharded else n
    most = padded // dp if sharded else n
    segments = bucket_count(padded * e, parallel.bucket_mb, most)
    return FlatLayout.contiguous(specs, dp, dp_rank, segments, sharded)


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
    # The loss is computed in fp32 even under 16-bit mixed precision (minipar.nn.precision).
    small = [Collective("tp", "allreduce", b * model.seq_len * max(e, 4))] * 3
    return ([Collective("tp", "allgather", x)] if parallel.sequence_parallel else []) + small


def chunk_tp(model: ModelConfig, parallel: ParallelConfig, stage: int, chunk: int, b: int,
             e: int, backward: bool) -> list[Collective]:
    """All tp collectives of one pass of one microbatch through one local chunk."""
    out: list[Collective] = []
    for unit in units(model, parallel, stage)[chunk]:
        fn = {"embed": embed_tp, "block": block_tp, "head": head_tp}[unit.kind]
        out += fn(model, parallel, b, e, backward)
    return out


def partial_elements(model: ModelConfig, parallel: ParallelConfig, stage: int,
                     dp_rank: int = 0, e: int = 4) -> int:
    """Elements of tp-partial gradients (LayerNorms, row-parallel biases, positions under SP)
    that a rank sums over tp once per step. Plain data parallelism sums all of them
    (``sync_tp_partial_grads``); ZeRO 1-3 only those inside this dp rank's shard of the flat
    layout (``ShardedState._sync_tp_partial``), which depends on ``dp_rank`` and on the
    layout (``e``, the element bytes, only matters through bucket sizes)."""
    if parallel.tp == 1 or not parallel.sequence_parallel:
        return 0
    if parallel.zero == 0:
        return sum(s.size for s in param_specs(model, parallel, stage) if s.tp_partial_grad)
    runs = dp_layout(model, parallel, stage, dp_rank, e).runs(lambda p: p.tp_partial_grad)
    return sum(n for partial, _, _, n in runs if partial)


def partial_grads_tp(model: ModelConfig, parallel: ParallelConfig, stage: int, e: int,
                     dp_rank: int = 0) -> list[Collective]:
    """Under SP, LayerNorm, row-parallel bias and position gradients are partial sums over tp:
    one allreduce of those this rank syncs (``partial_elements``), flattened, per step after
    the dp sync; none when there are none."""
    n = partial_elements(model, parallel, stage, dp_rank, e)
    return [Collective("tp", "allreduce", n * e)] if n else []


def step_metrics(parallel: ParallelConfig) -> list[Collective]:
    """The loss and squared gradient norm, two float64 summed over the world once a step."""
    return [Collective("world", "allreduce", 16)] if parallel.world > 1 else []


def dp_sync(model: ModelConfig, parallel: ParallelConfig, stage: int, e: int, m: int,
            dp_rank: int = 0, param_e: int | None = None) -> list[Collective]:
    """Data-parallel traffic of one step, for the ZeRO stage of ``parallel`` (see
    ``minipar.parallel.data`` and ``minipar.parallel.zero``), segment by segment of
    ``dp_layout``.

    ZeRO-0: one allreduce per segment (one segment, or ``bucket_count`` buckets with
    ``bucket_mb``). ZeRO-1/2: one reduce-scatter per segment of the padded flat gradient (with
    buckets min(Psi'/dp, ceil(Psi' e / bucket)) calls), then ONE allgather of the updated flat
    parameters. ZeRO-3: per microbatch an allgather of each unit's padded parameters before its
    forward and again before its backward, and a reduce-scatter of its gradients after its
    backward; a tied head uses the embedding's gather, so it is still one per pass.

    ``e`` is the gradient buffer's element bytes, ``param_e`` the working weights' (both ``e``
    unless mixed precision: 2, and ``e`` 4 when microbatches accumulate in fp32). ZeRO-3 moves
    weights and per-microbatch gradients in the working dtype.
    """
    if parallel.dp == 1:
        return []
    pe = e if param_e is None else param_e
    layout = dp_layout(model, parallel, stage, dp_rank, e)
    sizes = [seg.size * e for seg in layout.segments]
    if parallel.zero == 0:
        return [Collective("dp", "allreduce", n) for n in sizes]
    if parallel.zero in (1, 2):
        return ([Collective("dp", "reduce_scatter", n) for n in sizes]
                + [Collective("dp", "allgather", layout.total * pe)])
    sizes = [seg.size * pe for seg in layout.segments]
    per_mb = [c for n in sizes for c in (Collective("dp", "allgather", n),
                                          Collective("dp", "allgather", n),
                                          Collective("dp", "reduce_scatter", n))]
    return per_mb * m


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


def element_bytes(dtype_bytes: int, precision: str | None, m: int) -> tuple[int, int]:
    """(working bytes, gradient-buffer bytes) per element: ``dtype_bytes`` for both, or by the
    mixed-precision policy (``minipar.nn.precision``) when ``precision`` is given."""
    if precision is None:
        return dtype_bytes, dtype_bytes
    pol = policy(precision)
    return pol.itemsize, numpy.dtype(pol.grad_dtype(m)).itemsize


def step_collectives(model: ModelConfig, parallel: ParallelConfig, batch_size: int,
                     dtype_bytes: int, stage: int = 0, dp_rank: int = 0,
                     precision: str | None = None) -> list[Collective]:
    """Every collective one rank (pipeline stage ``stage``, dp rank ``dp_rank``) issues in
    one training step; ``precision`` (fp32, fp64, bf16, fp16) overrides ``dtype_bytes``."""
    dp, m = parallel.dp, parallel.microbatches
    dtype_bytes, grad_bytes = element_bytes(dtype_bytes, precision, m)
    b = batch_size // (dp * m)
    out: list[Collective] = []
    for _ in range(m):
        for j in range(parallel.virtual_stages):
            out += chunk_tp(model, parallel, stage, j, b, dtype_bytes, backward=False)
            out += chunk_tp(model, parallel, stage, j, b, dtype_bytes, backward=True)
    out += pp_sends(model, parallel, stage, b, dtype_bytes, m)
    out += partial_grads_tp(model, parallel, stage, grad_bytes, dp_rank)
    out += dp_sync(model, parallel, stage, grad_bytes, m, dp_rank, param_e=dtype_bytes)
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
                       dtype_bytes: int, stage: int = 0, dp_rank: int = 0,
                       precision: str | None = None) -> dict:
    """Predicted ``CommStats`` of one rank of pipeline stage ``stage`` for one training step.

    ``batch_size`` is the global batch (over all dp replicas); each rank's microbatch is
    batch_size / (dp x microbatches). Returns {group: {op: {"calls": .., "bytes": ..}}}.
    Every rank of a stage records the same, except that under ZeRO 1-3 with sequence
    parallelism the tp allreduce of partial gradients covers only the ``dp_rank``'s shard.
    """
    return tally(step_collectives(model_cfg, parallel_cfg, batch_size, dtype_bytes, stage,
                                  dp_rank, precision))


def model_state_bytes(model: ModelConfig, parallel: ParallelConfig, stage: int,
                      precision: str = "fp32", optimizer: str = "adamw",
                      dp_rank: int = 0) -> dict:
    """Bytes of weights, gradients and optimizer state one rank keeps across steps, from the
    runtime's own flat layout (ZeRO's padding included): what ``Engine.memory()`` measures.

    ZeRO (Rajbhandari et al. 2019, section 3.1) in bytes per parameter: 2 + 2 + 12 = 16 under
    16-bit mixed precision with AdamW (fp32 master, m, v), the gradient 4 when microbatches
    accumulate in fp32; 4 + 4 + 8 in fp32. Psi the rank's parameters, Psi' the padded buffer,
    S the rank's shard: stage 0 keeps Psi of each, stage 1 Psi', Psi', S; stage 2 Psi', S, S;
    stage 3 S, S, S.
    """
    pol = policy(precision)
    ew, eg = element_bytes(0, precision, parallel.microbatches)
    k = pol.state_bytes(2 if optimizer == "adamw" else 1)
    layout = dp_layout(model, parallel, stage, dp_rank, eg)
    psi, full, shard = layout.numel, layout.total, layout.shard_size
    z = parallel.zero
    weights = psi if z == 0 else shard if z == 3 else full
    grads = psi if z == 0 else full if z == 1 else shard
    states = psi if z == 0 else shard
    return {"params": weights * ew, "grads": grads * eg, "optimizer": states * k}


__all__ = ["Collective", "ParamSpec", "param_specs", "dp_layout", "block_tp", "embed_tp",
           "head_tp", "chunk_tp", "partial_elements", "partial_grads_tp", "dp_sync",
           "step_metrics", "pp_sends", "step_collectives", "tally", "predict_comm_bytes",
           "element_bytes", "model_state_bytes"]
