"""The encoder-decoder over pipeline stages: stages hold encoder layers, then decoder layers.

The units in pipeline order are the 2L layers ``encoder.0 .. encoder.L-1, decoder.0 ..
decoder.L-1`` (``encdec_blocks``: one rule for the engine, the program checker's dataflow and
the cost model). Global chunk g holds a contiguous run of them, an equal share by default (or an
explicit count per chunk); the source embedding goes with the first encoder layer, the encoder's
final LayerNorm with the last, the target embedding with the first decoder layer, the head with
the last decoder layer.

What crosses a boundary (Megatron-LM's design for T5, compared below). The decoder needs the
encoder's output, the memory (B, S, C), in EVERY decoder layer's cross-attention, so in every
decoder stage. The activation passed between stages is therefore a pair once the encoder is
done:

* inside the encoder: ``x_enc`` (B, S, C), the encoder stream;
* at the encoder -> decoder boundary: ``memory`` (B, S, C) alone (the next chunk starts with the
  target embedding, which reads the decoder's input ids);
* inside the decoder: ``(x_dec, memory)``, sent as ONE buffer (B, T + S, C) and split on arrival.

Backward mirrors it. Every decoder stage receives ``(dx_dec, dmemory)`` from the next stage,
adds each of its own cross-attentions' memory gradients to ``dmemory`` and sends the pair on;
the stage holding the encoder's end receives the sum over every decoder layer of every later
stage and runs the encoder backward from it. Nothing else is needed: no extra collective, no
broadcast group, and the sum is the serial sum in the same order (last layer first), so the
pipeline equals the serial run exactly. Token ids (source padding mask, decoder input) are data,
not transfers: every stage reads its microbatch's packed ids, as every Megatron stage reads its
batch.

Cost. Each boundary inside the decoder carries B*S*C extra elements per microbatch forward and
as many backward (under sequence parallelism B*(S/tp)*C), on top of the GPT's B*T*C; a boundary
inside the encoder carries B*S*C in place of B*T*C. ``minipar.sim.encdec_cost.message_bytes``
prices exactly these bytes (tested equal to the runtime's ``CommStats``).

Megatron-LM (Shoeybi et al. 2019; the pipeline schedules of Narayanan et al. 2021) pipelines T5
the same way, as its ``pretrain_t5.py`` documents: in the encoder section one tensor goes
downstream (the encoder's hidden state), in the decoder section two (the finished encoder output
and the decoder's hidden state), with their gradients back. Two differences: Megatron sends
the two tensors as two messages and makes each stage wholly encoder or wholly decoder
(``--pipeline-model-parallel-split-rank``), while here the pair is one packed buffer (one
message, so the program checker's matching and deadlock proof apply unchanged) and a chunk may
hold the encoder's end and the decoder's start. The alternative, broadcasting the memory once
from the encoder's last stage to every decoder stage and reducing its gradient back, sends it to
each decoder stage once rather than along the chain, but needs a collective over the decoder
stages in the middle of the schedule; the chained pair is simpler and checked like every other
pipeline message.
"""

from __future__ import annotations

from contextlib import nullcontext

from minipar import backend
from minipar.config import ConfigError, ModelConfig
from minipar.models.encdec import PAD, DecoderLayer, EncoderLayer
from minipar.models.gpt import Embedding, Head, _drop_caches
from minipar.nn import functional as F
from minipar.nn.module import BuildContext, Hooks, LayerNorm, Module
from minipar.parallel.deferral import DeferredWeightGrads

SEQ = 1  # the sequence axis of (B, T, C) activations, along which the pair is packed


def encdec_blocks(n_layers: int, n_chunks: int, counts: tuple[int, ...] = ()) -> list[int]:
    """Layers (encoder then decoder ones, 2 * n_layers in all) per global chunk: ``counts`` when
    given, else an equal share. One clear ``ConfigError`` when the split does not fit."""
    units = 2 * n_layers
    if counts:
        if len(counts) != n_chunks or min(counts) < 1 or sum(counts) != units:
            raise ConfigError(f"--partition {','.join(map(str, counts))}: --arch encdec needs "
                              f"{n_chunks} counts >= 1 (one per virtual stage) summing to "
                              f"{units} (the encoder's and the decoder's layers)")
        return list(counts)
    if units % n_chunks:
        raise ConfigError(f"--arch encdec has 2 x --layers = {units} layers (encoder and "
                          f"decoder), which --pp x --virtual-stages = {n_chunks} must divide")
    return [units // n_chunks] * n_chunks


def boundary_parts(n_layers: int, blocks: list[int]) -> list[tuple[str, ...]]:
    """``parts[g]``: what the activation message INTO global chunk g carries (``()`` for g = 0):
    ``("x_enc",)``, ``("memory",)`` or ``("x_dec", "memory")``, packed in that order."""
    parts: list[tuple[str, ...]] = [()]
    start = 0
    for n in blocks[:-1]:
        start += n
        if start < n_layers:
            parts.append(("x_enc",))
        elif start == n_layers:
            parts.append(("memory",))
        else:
            parts.append(("x_dec", "memory"))
    return parts


def part_lengths(cfg: ModelConfig, tp: int = 1, sequence_parallel: bool = False) -> dict:
    """Rows along the sequence axis of each part: S or T, divided by tp under SP."""
    div = tp if sequence_parallel else 1
    return {"x_enc": cfg.src_len // div, "memory": cfg.src_len // div,
            "x_dec": cfg.seq_len // div}


def dataflow(n_layers: int, blocks: list[int]) -> dict:
    """What each global chunk makes, uses and finishes, for the program checker
    (``program_checks.check_dataflow``), with ``carries`` = ``boundary_parts``."""
    makes, uses, ends = [], [], []
    start = 0
    for n in blocks:
        lo, hi = start, start + n
        mk, us, en = set(), set(), set()
        if lo == 0:
            mk.add("x_enc")  # source embedding
        if lo < n_layers:
            us.add("x_enc")
        if lo < n_layers <= hi:
            mk.add("memory")  # the encoder's end turns its stream into the memory
            en.add("x_enc")
        if lo <= n_layers < hi:
            mk.add("x_dec")  # target embedding
        if hi > n_layers:
            us.update(("x_dec", "memory"))  # every decoder layer's cross-attention
        if hi == 2 * n_layers:
            en.update(("x_dec", "memory"))  # the head scores the last decoder output
        makes.append(frozenset(mk))
        uses.append(frozenset(us))
        ends.append(frozenset(en))
        start = hi
    return {"makes": makes, "uses": uses, "ends": ends,
            "carries": boundary_parts(n_layers, blocks)}


class EncDecChunk(Module):
    """Global chunk ``g`` of the encoder-decoder: a contiguous run of its layers with the
    embeddings, the encoder's LayerNorm and the head that go with them.

    ``forward(x, mb, ...)``: ``x`` is the packed ids (B, S + T) on chunk 0, else the pair
    ``(ids, message)`` (``reads_inputs``: the executor hands every stage its microbatch's ids).
    Returns the outgoing message (B, rows, C), or the loss on the last chunk. ``backward``
    takes the gradient of the outgoing message and returns that of the incoming one.
    """

    reads_inputs = True  # the executor passes (ids, message) to every chunk after the first

    def __init__(self, cfg: ModelConfig, ctx: BuildContext, g: int, blocks: list[int]):
        super().__init__()
        self.cfg, self.dtype = cfg, ctx.dtype
        L = cfg.n_layers  # noqa: N806 (the paper's symbol)
        lo = sum(blocks[:g])
        hi = lo + blocks[g]
        parts = boundary_parts(L, blocks) + [()]
        self.parts_in, self.parts_out = parts[g], parts[g + 1]
        self.lengths = part_lengths(cfg, ctx.tp.size, ctx.sequence_parallel)
        first, self.ends_encoder = lo == 0, lo < L <= hi
        self.src_embed = Embedding(ctx, cfg, "src_embed", "src_pos", cfg.src_len) if first else None
        self.encoder = [EncoderLayer(ctx, f"encoder.{i}", cfg) for i in range(lo, min(hi, L))]
        self.enc_norm = None
        if self.ends_encoder and cfg.norm == "pre":
            self.enc_norm = LayerNorm(ctx, "enc_norm", cfg.d_model)
            if ctx.sequence_parallel:  # partial gradients, as in the serial model
                for p in self.enc_norm.params():
                    p.tp_partial_grad = True
        self.tgt_embed = None
        if lo <= L < hi:
            self.tgt_embed = Embedding(ctx, cfg, "tgt_embed", "tgt_pos", cfg.seq_len)
        self.decoder = [DecoderLayer(ctx, f"decoder.{i - L}", cfg) for i in range(max(lo, L), hi)]
        self.head = Head(ctx, cfg) if hi == 2 * L else None
        self.units = [u for u in [self.src_embed, *self.encoder, self.enc_norm, self.tgt_embed,
                                  *self.decoder, self.head] if u is not None]
        self.deferred = DeferredWeightGrads()  # zero-bubble W passes waiting to run
        self.hooks = Hooks()

    def _run(self, unit, mb, *args):
        """One unit's forward between the data-parallel hooks (ZeRO-3 gathers, overlap)."""
        self.hooks.pre_forward(unit, mb)
        out = unit.forward(*args)
        self.hooks.post_forward(unit, mb)
        return out

    def _back(self, unit, mb, g):
        self.hooks.pre_backward(unit, mb)
        out = unit.backward(g, mb)
        self.hooks.post_backward(unit, mb)
        return out

    def _unpack(self, buf, parts) -> dict:
        """Message (B, rows, C) -> {part: (B, rows_part, C)}, split along the sequence."""
        out, at = {}, 0
        for name in parts:
            n = self.lengths[name]
            out[name] = buf[:, at:at + n]
            at += n
        return out

    def _pack(self, values: dict, parts):
        """{part: (B, rows_part, C)} -> one contiguous message (B, rows, C) in ``parts`` order."""
        if len(parts) == 1:
            return values[parts[0]]
        return backend.xp().concatenate([values[n] for n in parts], axis=SEQ)  # (B, T+S, C)

    def _hidden(self, x, mb) -> dict:
        """The units' forward up to the head: {"x_enc" or "x_dec": h, "memory": memory}."""
        ids, got = (x, {}) if not self.parts_in else (x[0], self._unpack(x[1], self.parts_in))
        src, tgt = ids[:, :self.cfg.src_len], ids[:, self.cfg.src_len:]
        bias = F.padding_bias(src != PAD, self.dtype)  # (B, 1, S): source padding masked
        h, memory = got.get("x_dec", got.get("x_enc")), got.get("memory")
        if self.src_embed is not None:
            h = self._run(self.src_embed, mb, src, mb)  # (B, S, C)
        for layer in self.encoder:
            h = self._run(layer, mb, h, mb, bias)  # (B, S, C)
        if self.enc_norm is not None:
            h = self._run(self.enc_norm, mb, h, mb)
        if self.ends_encoder:
            memory = h  # (B, S, C): the encoder's output, read by every decoder layer from here
        if self.tgt_embed is not None:
            h = self._run(self.tgt_embed, mb, tgt, mb)  # (B, T, C)
        for layer in self.decoder:
            h = self._run(layer, mb, h, mb, memory, bias)  # (B, T, C)
        return {"x_enc": h, "x_dec": h, "memory": memory}

    def forward(self, x, mb=0, targets=None, normalizer=None):
        out = self._hidden(x, mb)
        if self.head is not None:
            return self._run(self.head, mb, out["x_dec"], mb, targets, normalizer)
        return self._pack(out, self.parts_out)

    def backward(self, dy=None, mb=0, defer_weight_grads: bool = False):
        """Gradient of the incoming message from that of the outgoing one (None on chunk 0):
        dmemory arrives with dx_dec, gains each local cross-attention's share, leaves with it."""
        with self.deferred.collect(self, mb) if defer_weight_grads else nullcontext():
            got = self._unpack(dy, self.parts_out) if self.head is None else {}
            g, dmemory = got.get("x_dec", got.get("x_enc")), got.get("memory")
            if self.head is not None:
                g = self._back(self.head, mb, 1.0)
            for layer in reversed(self.decoder):
                g, dm = self._back(layer, mb, g)
                dmemory = dm if dmemory is None else dmemory + dm  # (B, S, C), serial order
            if self.tgt_embed is not None:
                g = self._back(self.tgt_embed, mb, g)  # None: ids have no gradient
            if self.ends_encoder:
                g, dmemory = dmemory, None  # the encoder's stream now carries the memory's
            if self.enc_norm is not None:
                g = self._back(self.enc_norm, mb, g)
            for layer in reversed(self.encoder):
                g = self._back(layer, mb, g)  # (B, S, C)
            if self.src_embed is not None:
                return self._back(self.src_embed, mb, g)  # None
        return self._pack({"x_enc": g, "x_dec": g, "memory": dmemory}, self.parts_in)

    def backward_weights(self, mb=0) -> None:
        """The deferred weight-gradient pass of microbatch ``mb`` (zero-bubble "W")."""
        self.deferred.run(mb)

    def predict(self, x):
        """The outgoing message with no caches kept (evaluation, not the last chunk)."""
        out = self._hidden(x, "_eval")
        for unit in self.units:
            _drop_caches(unit, "_eval")
        return self._pack(out, self.parts_out)

    def evaluate(self, x, targets=None):
        """The last chunk's greedy predictions and summed loss (see ``Head.evaluate``)."""
        h = self._hidden(x, "_eval")["x_dec"]
        for unit in self.units[:-1]:
            _drop_caches(unit, "_eval")
        self.hooks.pre_forward(self.head, "_eval")
        out = self.head.evaluate(h, targets)
        self.hooks.post_forward(self.head, "_eval")
        return out


def build_encdec_chunks(cfg: ModelConfig, ctx: BuildContext, pp: int, virtual: int,
                        stage: int, counts: tuple[int, ...] = ()) -> list[EncDecChunk]:
    """This rank's chunks: global chunks stage, stage + pp, ... (PTD-P interleaving)."""
    blocks = encdec_blocks(cfg.n_layers, pp * virtual, counts)
    return [EncDecChunk(cfg, ctx, g, blocks) for g in range(stage, pp * virtual, pp)]


def message_shape(cfg: ModelConfig, g: int, rows: int, pp: int, virtual: int, tp: int = 1,
                  sequence_parallel: bool = False, counts: tuple[int, ...] = ()) -> tuple:
    """Shape of the activation message into global chunk g (and of its gradient)."""
    parts = boundary_parts(cfg.n_layers, encdec_blocks(cfg.n_layers, pp * virtual, counts))
    n = part_lengths(cfg, tp, sequence_parallel)
    return (rows, sum(n[p] for p in parts[g]), cfg.d_model)


def describe_stages(cfg: ModelConfig, pp: int, virtual: int,
                    counts: tuple[int, ...] = ()) -> str:
    """One banner line: the layers of each global chunk and what crosses each boundary."""
    L = cfg.n_layers  # noqa: N806
    blocks = encdec_blocks(L, pp * virtual, counts)
    parts = boundary_parts(L, blocks)
    cells, start = [], 0
    for g, n in enumerate(blocks):
        names = [f"enc{i}" if i < L else f"dec{i - L}" for i in range(start, start + n)]
        cells.append(("" if g == 0 else f" ={'+'.join(parts[g])}=> ") + ",".join(names))
        start += n
    return f"stages  | {''.join(cells)} (chunks in order; the decoder's boundaries carry the pair)"
