"""What the encoder-decoder (``--arch encdec``) costs: parameters, FLOPs, activations, bytes.

The GPT's formulas (``minipar.sim.costmodel``, ``minipar.sim.comm_volume``) with the
encoder-decoder's units in their place, written once here and called from there, so the train
banner, the memory pre-check, the simulator and the tests price the same model:

* units in pipeline order: source embedding, encoder layers (self-attention + MLP over S
  tokens), the encoder's LayerNorm (pre-LN), target embedding, decoder layers (causal
  self-attention over T tokens, cross-attention from T queries to S memory rows, MLP), head;
  the split over chunks is ``minipar.models.encdec_pipeline.encdec_blocks``;
* tensor parallelism (Megatron, Shoeybi et al. 2019): an encoder layer is a GPT block over S
  tokens (2 allreduces forward, 2 backward); a decoder layer has three sublayers, so 3 g's
  forward over (b, T, h), and in backward the f of the self-attention's QKV, the
  cross-attention's Q and the MLP over (b, T, h) plus the f of the cross-attention's K/V over
  the memory, (b, S, h). Under sequence parallelism (Korthikanti et al. 2022) each allreduce
  is an allgather and a reduce-scatter of the same bytes and every column-parallel matrix
  re-gathers its input in backward;
* pipeline messages: (b, S, h) inside the encoder and at its end, the packed pair
  (b, T + S, h) inside the decoder (``encdec_pipeline``'s docstring explains the pair).

Rows are plain tuples, ``(name, shape, unit, tp_partial)`` for a parameter and
``(group, op, bytes)`` for a collective, which ``comm_volume`` wraps in its own types.
"""

from __future__ import annotations

from math import prod

from minipar.config import ConfigError, ModelConfig, ParallelConfig, check_encdec_split
from minipar.models.encdec_pipeline import boundary_parts, encdec_blocks, part_lengths
from minipar.parallel.tensor import padded_vocab


def chunk_kinds(model: ModelConfig, parallel: ParallelConfig, g: int) -> list[tuple[str, int]]:
    """(kind, layer index) of global chunk g's units in forward order; kinds are
    src_embed, encoder, enc_norm, tgt_embed, decoder, head."""
    L = model.n_layers  # noqa: N806
    n = parallel.pp * parallel.virtual_stages
    blocks = encdec_blocks(L, n, parallel.partition) if n > 1 else [2 * L]
    lo = sum(blocks[:g])
    hi = lo + blocks[g]
    out = [("src_embed", 0)] if lo == 0 else []
    out += [("encoder", i) for i in range(lo, min(hi, L))]
    if lo < L <= hi and model.norm == "pre":
        out.append(("enc_norm", 0))
    if lo <= L < hi:
        out.append(("tgt_embed", 0))
    out += [("decoder", i - L) for i in range(max(lo, L), hi)]
    return out + ([("head", 0)] if hi == 2 * L else [])


def _sublayer(n: str, h: int, t: int, sp: bool, mats: list) -> list:
    """A residual sublayer's LayerNorm, then its matrices (name, in, out, split: col|row)."""
    rows = [(f"{n}.ln.g", (h,), sp), (f"{n}.ln.b", (h,), sp)]
    for name, i, o, split in mats:
        if split == "col":
            rows += [(f"{n}.{name}.w", (i, o // t), False), (f"{n}.{name}.b", (o // t,), False)]
        else:
            rows += [(f"{n}.{name}.w", (i // t, o), False), (f"{n}.{name}.b", (o,), sp)]
    return rows


def unit_params(model: ModelConfig, parallel: ParallelConfig, kind: str, i: int) -> list:
    """(name, tp-local shape, tp_partial) of one unit's parameters, in ``params()`` order."""
    h, f, t, sp = model.d_model, model.ffn, parallel.tp, parallel.sequence_parallel
    vp = padded_vocab(model.vocab_size, t)
    tied = model.tie_weights
    mlp = [("fc", h, f, "col"), ("proj", f, h, "row")]
    attn = [("qkv", h, 3 * h, "col"), ("proj", h, h, "row")]
    if kind in ("src_embed", "tgt_embed"):
        pre = kind.split("_")[0]
        length = model.src_len if pre == "src" else model.seq_len
        rows = [(f"{pre}_pos", (length, h), sp)] if model.pos == "learned" else []
        return rows + ([] if tied and pre == "tgt" else [(f"{kind}.w", (vp // t, h), False)])
    if kind == "encoder":
        rows = _sublayer(f"encoder.{i}.attn", h, t, sp, attn)
        if model.pos_bias:  # the attention's own parameter comes before its linears'
            s = model.src_len
            rows.insert(2, (f"encoder.{i}.attn.pos_bias", (model.n_heads // t, s, s), False))
        return rows + _sublayer(f"encoder.{i}.mlp", h, t, sp, mlp)
    if kind == "decoder":
        cross = [("q", h, h, "col"), ("kv", h, 2 * h, "col"), ("proj", h, h, "row")]
        return (_sublayer(f"decoder.{i}.self_attn", h, t, sp, attn)
                + _sublayer(f"decoder.{i}.cross", h, t, sp, cross)
                + _sublayer(f"decoder.{i}.mlp", h, t, sp, mlp))
    if kind == "enc_norm":
        return [("enc_norm.g", (h,), sp), ("enc_norm.b", (h,), sp)]
    return [("ln_f.g", (h,), sp), ("ln_f.b", (h,), sp)] + (
        [] if tied else [("head.w", (h, vp // t), False)])


def param_rows(model: ModelConfig, parallel: ParallelConfig, stage: int) -> list[tuple]:
    """(name, shape, unit, tp_partial) of every parameter a rank of ``stage`` holds, in
    ``Engine.params`` order, ``unit`` counting this rank's units in forward order."""
    out, unit = [], 0
    n = parallel.pp * parallel.virtual_stages
    for g in range(stage, n, parallel.pp):
        for kind, i in chunk_kinds(model, parallel, g):
            out += [(name, shape, unit, part) for name, shape, part
                    in unit_params(model, parallel, kind, i)]
            unit += 1
    return out


def units(model: ModelConfig, parallel: ParallelConfig, stage: int) -> list[list[tuple]]:
    """(kind, elements one tp rank holds) of each unit of each chunk of ``stage``."""
    n = parallel.pp * parallel.virtual_stages
    return [[(kind, sum(prod(s) for _, s, _ in unit_params(model, parallel, kind, i)))
             for kind, i in chunk_kinds(model, parallel, g)]
            for g in range(stage, n, parallel.pp)]


# --------------------------------------------------------------------------- tensor parallel
def _pair(x: int, sp: bool, backward: bool) -> list[tuple]:
    """One column-parallel in, row-parallel out sublayer over a (b, n, h) stream of x bytes:
    g forward (allreduce; SP: reduce-scatter), f backward (allreduce; SP: allgather of dy for
    the row-parallel matrix, reduce-scatter of dx, and the re-gather of the cached shard)."""
    if not sp:
        return [("tp", "allreduce", x)]
    if not backward:
        return [("tp", "allgather", x), ("tp", "reduce_scatter", x)]
    return [("tp", "allgather", x), ("tp", "reduce_scatter", x), ("tp", "allgather", x)]


def unit_tp(model: ModelConfig, parallel: ParallelConfig, kind: str, b: int, e: int,
            backward: bool) -> list[tuple]:
    """The tp collectives of one unit, one microbatch, one pass (see the module docstring)."""
    if parallel.tp == 1:
        return []
    sp = parallel.sequence_parallel
    xs = b * model.src_len * model.d_model * e  # (b, S, h)
    xt = b * model.seq_len * model.d_model * e  # (b, T, h)
    if kind in ("src_embed", "tgt_embed"):
        x = xs if kind == "src_embed" else xt
        if sp:
            return [("tp", "allgather" if backward else "reduce_scatter", x)]
        return [] if backward else [("tp", "allreduce", x)]
    if kind == "encoder":
        return _pair(xs, sp, backward) * 2
    if kind == "decoder":
        out = _pair(xt, sp, backward) * 3  # self-attention, cross-attention's Q and out, MLP
        if not sp:
            return out + ([("tp", "allreduce", xs)] if backward else [])  # f of K/V
        kv = [("tp", "reduce_scatter", xs), ("tp", "allgather", xs)] if backward else []
        return out + [("tp", "allgather", xs)] * (0 if backward else 1) + kv
    if kind == "head":
        if backward:
            return ([("tp", "allgather", xt), ("tp", "reduce_scatter", xt)] if sp
                    else [("tp", "allreduce", xt)])
        small = [("tp", "allreduce", b * model.seq_len * e)] * 3
        return ([("tp", "allgather", xt)] if sp else []) + small
    return []  # the encoder's LayerNorm


def stage_tp(model: ModelConfig, parallel: ParallelConfig, stage: int, b: int, e: int,
             m: int) -> list[tuple]:
    """Every tp collective of one stage's passes in a step (m microbatches, both passes)."""
    kinds = [k for chunk in units(model, parallel, stage) for k, _ in chunk]
    out = []
    for _ in range(m):
        for backward in (False, True):
            for kind in kinds:
                out += unit_tp(model, parallel, kind, b, e, backward)
    return out


# ---------------------------------------------------------------------------------- pipeline
def message_bytes(model: ModelConfig, parallel: ParallelConfig, g: int, b: int, e: int) -> int:
    """Bytes of the message into global chunk g (and of its gradient): x_enc, memory, or the
    packed pair (x_dec, memory); under SP each rank's sequence shard."""
    n = parallel.pp * parallel.virtual_stages
    parts = boundary_parts(model.n_layers, encdec_blocks(model.n_layers, n, parallel.partition))[g]
    rows = part_lengths(model, parallel.tp, parallel.sequence_parallel)
    return b * sum(rows[p] for p in parts) * model.d_model * e


def pp_sends(model: ModelConfig, parallel: ParallelConfig, stage: int, b: int, e: int,
             m: int) -> list[tuple]:
    """Point-to-point traffic of one stage per step, sends and receives (CommStats counts
    both): per microbatch the activation out of and the gradient into every chunk but the last
    global one, the activation into and gradient out of every chunk but the first."""
    p, v = parallel.pp, parallel.virtual_stages
    if p == 1:
        return []
    out = []
    for g in range(stage, p * v, p):
        for edge in ([g + 1] if g < p * v - 1 else []) + ([g] if g > 0 else []):
            x = message_bytes(model, parallel, edge, b, e)
            out += [("pp", "send", x), ("pp", "recv", x)] * m
    return out


def pipeline_bytes(model: ModelConfig, parallel: ParallelConfig, b: int, e: int,
                   m: int) -> tuple[int, int]:
    """(bytes this model sends between stages per step on one pipeline of one tp rank, the
    same for a GPT-sized (b, T, h) message at every boundary), activations and gradients."""
    n = parallel.pp * parallel.virtual_stages
    rows = part_lengths(model, parallel.tp, parallel.sequence_parallel)
    gpt = b * rows["x_dec"] * model.d_model * e
    mine = sum(message_bytes(model, parallel, g, b, e) for g in range(1, n))
    return 2 * m * mine, 2 * m * gpt * (n - 1)


def extra_pair_bytes(model: ModelConfig, parallel: ParallelConfig, b: int, e: int,
                     m: int) -> int:
    """What the encoder-decoder's messages add over GPT-sized ones, per step and pipeline:
    B*S*C per decoder boundary (the memory) and B*(S - T)*C per encoder boundary, both ways."""
    mine, gpt = pipeline_bytes(model, parallel, b, e, m)
    return mine - gpt


# ------------------------------------------------------------------------- FLOPs, activations
def layer_forward_flops(model: ModelConfig, kind: str, b: int) -> float:
    """Matrix-multiply FLOPs of one unit's forward for b pairs (2 per multiply-add): an encoder
    layer 2bS(4h^2 + 2hF) + 4bS^2h; a decoder layer's self-attention 8bTh^2 + 4bT^2h,
    cross-attention 4bTh^2 (Q, out) + 4bSh^2 (K/V of the memory) + 4bTSh (scores, values), MLP
    4bThF; the head's logits 2bThV (Korthikanti et al. 2022, appendix A, with S and T apart)."""
    s, t, h, f, v = model.src_len, model.seq_len, model.d_model, model.ffn, model.vocab_size
    if kind == "encoder":
        return 2 * b * s * (4 * h * h + 2 * h * f) + 4 * b * s * s * h
    if kind == "decoder":
        return (8 * b * t * h * h + 4 * b * t * t * h + 4 * b * t * h * h + 4 * b * s * h * h
                + 4 * b * t * s * h + 4 * b * t * h * f)
    return 2 * b * t * h * v if kind == "head" else 0


def forward_flops(model: ModelConfig, b: int) -> float:
    """One forward of the whole model for b pairs: L encoder and L decoder layers, the head."""
    return (model.n_layers * (layer_forward_flops(model, "encoder", b)
                              + layer_forward_flops(model, "decoder", b))
            + layer_forward_flops(model, "head", b))


def chunk_forward_flops(model: ModelConfig, parallel: ParallelConfig, g: int, b: int) -> float:
    """Forward FLOPs of global chunk g (its layers, and the head's logits on the last)."""
    return sum(layer_forward_flops(model, kind, b) for kind, _ in chunk_kinds(model, parallel, g))


def model_flops(model: ModelConfig, batch: int) -> float:
    """A training step's FLOPs: 3 x forward (Korthikanti eq. 7's convention)."""
    return 3 * forward_flops(model, batch)


def layer_activation_bytes(model: ModelConfig, kind: str, b: int, tp: int = 1,
                           sequence_parallel: bool = False, value_bytes: int = 4,
                           recompute: str = "none") -> int:
    """Bytes one layer keeps for its backward per microbatch, minipar's kernels (no dropout,
    LayerNorm keeps 1/std), by the terms of ``costmodel.block_activation_terms``: an encoder
    layer is a GPT block over S tokens; a decoder layer a block over T tokens plus the
    cross-attention's LayerNorm, Q input, the memory (its K/V input, (b, S', h)), [Q], [K|V]
    (b, S, 2h/t), the (a/t) T S softmax and the merged heads. Selective recomputation drops
    the softmax terms; full keeps the layer's input (and a decoder layer's memory shard)."""
    e, h = value_bytes, model.d_model
    a = 0 if recompute == "selective" else model.n_heads // tp
    s, t = model.src_len, model.seq_len
    div = tp if sequence_parallel else 1
    if recompute == "full":
        n = {"encoder": s, "decoder": t}.get(kind, 0)
        return e * b * h * (n + (s if kind == "decoder" else 0)) // div

    def block(n: int) -> int:
        nl = n // div  # tokens per rank in the LayerNorm / residual regions
        return (2 * e * b * nl * (h + 1) + 2 * e * b * nl * h + e * 3 * b * n * h // tp
                + e * b * a * n * n + e * b * n * h // tp + e * b * n * model.ffn // tp * 2)

    if kind == "encoder":
        return block(s)
    if kind != "decoder":
        return 0
    cross = (e * b * (t // div) * (h + 1) + e * b * (t // div) * h + e * b * (s // div) * h
             + e * b * t * h // tp + e * 2 * b * s * h // tp + e * b * a * t * s
             + e * b * t * h // tp)
    return block(t) + cross


def chunk_activation_bytes(model: ModelConfig, parallel: ParallelConfig, g: int, b: int,
                           value_bytes: int = 4, recompute: str = "none") -> int:
    """Bytes global chunk g's layers keep per microbatch (``layer_activation_bytes`` summed)."""
    return sum(layer_activation_bytes(model, kind, b, parallel.tp, parallel.sequence_parallel,
                                      value_bytes, recompute)
               for kind, _ in chunk_kinds(model, parallel, g))


# -------------------------------------------------------------------------------- partition
def balanced_blocks(model: ModelConfig, n_chunks: int) -> list[int]:
    """Layers per global chunk (each >= 1) minimising the largest chunk's forward FLOPs, the
    head's logits counted on the last: a decoder layer costs more than an encoder layer, so
    decoder chunks get fewer. Dynamic programming over contiguous splits; ties keep the
    split nearest to equal."""
    L = model.n_layers  # noqa: N806
    units = 2 * L
    if n_chunks > units:
        raise ConfigError(f"--partition balanced: {n_chunks} virtual stages need at least "
                          f"{n_chunks} layers, --arch encdec has 2 x --layers = {units}")
    cost = [layer_forward_flops(model, "encoder" if i < L else "decoder", 1)
            for i in range(units)]
    cost[-1] += layer_forward_flops(model, "head", 1)
    inf = float("inf")
    best = [[inf] * (units + 1) for _ in range(n_chunks + 1)]
    take = [[0] * (units + 1) for _ in range(n_chunks + 1)]
    best[0][0] = 0.0
    for c in range(1, n_chunks + 1):
        for k in range(c, units - (n_chunks - c) + 1):
            for t in range(1, k - c + 2):
                val = max(best[c - 1][k - t], sum(cost[k - t:k]))
                near = abs(t - units / n_chunks) < abs(take[c][k] - units / n_chunks)
                if val < best[c][k] or (val == best[c][k] and near):
                    best[c][k], take[c][k] = val, t
    blocks, k = [], units
    for c in range(n_chunks, 0, -1):
        blocks.append(take[c][k])
        k -= take[c][k]
    return blocks[::-1]


def resolve_partition(text: str, model: ModelConfig, pp: int, virtual: int) -> tuple[int, ...]:
    """``--partition equal|balanced|N,N,...`` for the encoder-decoder -> layers per global
    chunk (``()`` = equal); one ``ConfigError`` line naming the flag otherwise."""
    n_chunks = pp * virtual
    text = text.strip()
    if text == "equal" or n_chunks == 1:
        if text not in ("equal", "balanced"):
            raise ConfigError(f"--partition {text}: needs --pp > 1 (one stage holds every layer)")
        return ()
    if text == "balanced":
        return tuple(balanced_blocks(model, n_chunks))
    try:
        blocks = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--partition {text!r}: expected equal, balanced or layer counts "
                          "per virtual stage such as 3,1") from None
    check_encdec_split(blocks, model.n_layers, n_chunks)
    return blocks
