"""How the model is cut into pipeline stages, and what each stage costs: the partition report.

minipar splits the blocks into ``pp x virtual_stages`` contiguous chunks
(``minipar.models.gpt.chunk_specs``, the single source of the split); the embedding goes with the
first chunk, the final LayerNorm, LM head and loss with the last. Rank s holds global chunks
s, s + pp, ... (interleaving, Narayanan et al. 2021). By default every chunk gets the same number
of blocks, but equal block counts are not equal work: the first stage also looks up embeddings
(no FLOPs, many parameters) and the last computes the logits over the vocabulary (2 b s h V
FLOPs). The report shows both per stage, so the slowest stage, which sets the pace of the whole
pipeline, is visible before a run starts, and ``--partition`` (``resolve_partition``) lets a run
choose another split: ``balanced`` (``balanced_blocks``, the split whose slowest chunk has the
fewest FLOPs) or explicit block counts ``N,N,...``.

Counts are for the full (unsharded) model: a tensor-parallel rank holds about 1/tp of them.
FLOPs are per sequence and training step: forward plus backward, 3 x the forward's
matrix-multiply FLOPs (Korthikanti et al. 2022, eq. 7), from ``minipar.sim.costmodel``.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipar.config import ConfigError, ModelConfig, check_partition
from minipar.models.gpt import chunk_specs
from minipar.sim.costmodel import block_param_count, layer_forward_flops, logit_forward_flops


@dataclass(frozen=True)
class ChunkCost:
    """One model chunk: where it runs, what it holds, what it costs."""

    stage: int  # pipeline rank that holds it
    index: int  # global chunk index (0 = first, holds the embedding)
    first_layer: int
    n_layers: int
    embedding: bool
    head: bool
    params: int  # parameters of the full model in this chunk
    flops: float  # training FLOPs per sequence (forward + backward)

    def describe(self) -> str:
        """``embedding + blocks 0-3`` / ``blocks 4-7 + head``."""
        last = self.first_layer + self.n_layers - 1
        parts = ["embedding"] if self.embedding else []
        if self.n_layers:
            parts.append(f"blocks {self.first_layer}-{last}" if self.n_layers > 1
                         else f"block {self.first_layer}")
        if self.head:
            parts.append("head")
        return " + ".join(parts)


def _embedding_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.d_model + (cfg.seq_len * cfg.d_model if cfg.pos == "learned"
                                           else 0)


def _head_params(cfg: ModelConfig, n_chunks: int) -> int:
    # A tied head shares the embedding's matrix only when both sit in the same (only) chunk.
    tied = cfg.tie_weights and n_chunks == 1
    return 2 * cfg.d_model + (0 if tied else cfg.d_model * cfg.vocab_size)


def unit_flops(cfg: ModelConfig) -> tuple[float, float, float]:
    """Training FLOPs per sequence of (embedding, one block, head): 3 x forward."""
    return 0.0, 3.0 * layer_forward_flops(cfg, 1), 3.0 * logit_forward_flops(cfg, 1)


@dataclass(frozen=True)
class PartitionReport:
    """Every chunk of a pp x virtual split, with per-stage totals and a balance summary."""

    cfg: ModelConfig
    pp: int
    virtual: int
    chunks: tuple[ChunkCost, ...]  # by stage, then by local chunk

    def stage_chunks(self, stage: int) -> list[ChunkCost]:
        return [c for c in self.chunks if c.stage == stage]

    def stage_params(self, stage: int) -> int:
        return sum(c.params for c in self.stage_chunks(stage))

    def stage_flops(self, stage: int) -> float:
        return sum(c.flops for c in self.stage_chunks(stage))

    @property
    def imbalance(self) -> float:
        """The slowest stage's FLOPs over the mean stage's (1.0 is perfect balance)."""
        flops = [self.stage_flops(s) for s in range(self.pp)]
        mean = sum(flops) / self.pp
        return max(flops) / mean if mean else 1.0

    @property
    def blocks(self) -> list[int]:
        """Blocks per global chunk, in chunk order (what ``--partition N,N,...`` writes)."""
        return [c.n_layers for c in sorted(self.chunks, key=lambda c: c.index)]

    def kind(self) -> str:
        """``equal``, ``balanced``, ``equal = balanced`` or ``explicit``: which split this is."""
        n = len(self.chunks)
        equal = self.blocks == [self.cfg.n_layers // n] * n
        balanced = (n <= self.cfg.n_layers and
                    self.blocks == balanced_blocks(self.cfg, self.pp, self.virtual))
        return {(True, True): "equal = balanced", (True, False): "equal",
                (False, True): "balanced"}.get((equal, balanced), "explicit")

    def lines(self) -> list[str]:
        """One line on the split, one per stage, then one on balance (the train banner's)."""
        total_p = sum(c.params for c in self.chunks)
        total_f = sum(c.flops for c in self.chunks)
        width = len(str(self.pp - 1))
        shown = ",".join(str(b) for b in self.blocks)
        out = [f"split   | --partition {shown} ({self.kind()}): blocks per virtual stage"]
        for s in range(self.pp):
            parts = "; ".join(
                (f"chunk {c.index}: " if self.virtual > 1 else "") + c.describe()
                for c in self.stage_chunks(s))
            p, f = self.stage_params(s), self.stage_flops(s)
            out.append(f"stage {s:>{width}} | {parts}: {p:,} params ({100 * p / total_p:.0f}%), "
                       f"{_fmt_flops(f)}/seq ({100 * f / total_f:.0f}%)")
        line = f"balance | slowest stage {self.imbalance:.2f}x the mean FLOPs"
        n = len(self.chunks)
        if self.pp > 1 and n <= self.cfg.n_layers:
            best = balanced_blocks(self.cfg, self.pp, self.virtual)
            alt = partition(self.cfg, self.pp, self.virtual, tuple(best))
            if best != self.blocks and alt.imbalance < self.imbalance:
                line += (f"; --partition balanced ({','.join(map(str, best))}) would give "
                         f"{alt.imbalance:.2f}x")
        out.append(line)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _fmt_flops(f: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if f >= scale:
            return f"{f / scale:.1f} {unit}"
    return f"{f:.0f} FLOP"


def _chunk(cfg: ModelConfig, stage: int, index: int, n_chunks: int, first: int,
           n_layers: int) -> ChunkCost:
    emb_f, block_f, head_f = unit_flops(cfg)
    is_first, is_last = index == 0, index == n_chunks - 1
    params = n_layers * block_param_count(cfg)
    params += _embedding_params(cfg) if is_first else 0
    params += _head_params(cfg, n_chunks) if is_last else 0
    flops = n_layers * block_f + (emb_f if is_first else 0.0) + (head_f if is_last else 0.0)
    return ChunkCost(stage, index, first, n_layers, is_first, is_last, params, flops)


def partition(cfg: ModelConfig, pp: int, virtual: int = 1,
              blocks: tuple[int, ...] = ()) -> PartitionReport:
    """The report of the split minipar runs: ``chunk_specs`` for every stage (``blocks``: the
    blocks per global chunk, as ``ParallelConfig.partition``; empty = equal)."""
    chunks = []
    for s in range(pp):
        for spec in chunk_specs(cfg, pp, virtual, s, tuple(blocks)):
            chunks.append(_chunk(cfg, s, spec.index, spec.n_chunks, spec.first_layer,
                                 spec.n_layers))
    return PartitionReport(cfg, pp, virtual, tuple(chunks))


def partition_blocks(cfg: ModelConfig, blocks: list[int]) -> PartitionReport:
    """The report of any contiguous split, one chunk per stage, ``blocks[s]`` blocks on s."""
    if sum(blocks) != cfg.n_layers or min(blocks) < 0:
        raise ValueError(f"blocks {blocks} must be >= 0 and sum to the {cfg.n_layers} layers")
    return partition(cfg, len(blocks), 1, tuple(blocks))


def balanced_blocks(cfg: ModelConfig, pp: int, virtual: int = 1) -> list[int]:
    """Blocks per global chunk (each >= 1) for ``pp`` stages of ``virtual`` chunks each that
    minimise the slowest stage's FLOPs; ties keep it equal (``--partition balanced``).

    Every stage runs all its chunks for every microbatch, so a stage's pace is the sum of its
    chunks. First the blocks per stage, by dynamic programming: best[s][k] is the smallest
    possible maximum stage cost when k blocks go to stages 0..s-1 (each at least ``virtual``);
    stage 0 also pays the embedding and stage pp-1 the head. Then each stage's blocks are dealt
    out to its chunks one at a time, to the chunk that costs least so far (the head's chunk
    fills last), so that no single pass of the schedule is much longer than the others.
    """
    n, n_chunks = cfg.n_layers, pp * virtual
    if not 1 <= n_chunks <= n:
        raise ValueError(f"need 1 <= pp x virtual <= layers, got {pp} x {virtual}, layers={n}")
    emb_f, block_f, head_f = unit_flops(cfg)

    def extra(s: int) -> float:
        return (emb_f if s == 0 else 0.0) + (head_f if s == pp - 1 else 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    choice = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for s in range(1, pp + 1):
        for k in range(s * virtual, n - (pp - s) * virtual + 1):
            for take in range(virtual, k - (s - 1) * virtual + 1):
                c = max(best[s - 1][k - take], take * block_f + extra(s - 1))
                # Prefer the split closest to equal among equally good ones.
                if c < best[s][k] or (c == best[s][k] and
                                      abs(take - n / pp) < abs(choice[s][k] - n / pp)):
                    best[s][k], choice[s][k] = c, take
    per_stage, k = [], n
    for s in range(pp, 0, -1):
        per_stage.append(choice[s][k])
        k -= choice[s][k]
    per_stage.reverse()
    if n % n_chunks == 0 and max((n // pp) * block_f + extra(s) for s in range(pp)) \
            <= best[pp][n]:
        return [n // n_chunks] * n_chunks
    blocks = [1] * n_chunks
    for s, total in enumerate(per_stage):
        mine = list(range(s, n_chunks, pp))  # this stage's global chunks
        for _ in range(total - virtual):
            g = min(mine, key=lambda g: (blocks[g] * block_f + (emb_f if g == 0 else 0.0)
                                         + (head_f if g == n_chunks - 1 else 0.0), g))
            blocks[g] += 1
    return blocks


def resolve_partition(text: str, cfg: ModelConfig, pp: int, virtual: int = 1) -> tuple[int, ...]:
    """``--partition equal|balanced|N,N,...`` -> blocks per global chunk (``()`` = equal, the
    default split); ``ConfigError`` with one line naming the flag for anything else."""
    n_chunks = pp * virtual
    text = text.strip()
    if text == "equal":
        return ()
    if text == "balanced":
        if n_chunks > cfg.n_layers:
            raise ConfigError(f"--partition balanced: --pp x --virtual-stages = {n_chunks} "
                              f"virtual stages need at least {n_chunks} layers, the model has "
                              f"--layers {cfg.n_layers}")
        return tuple(balanced_blocks(cfg, pp, virtual))
    try:
        blocks = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--partition {text!r}: expected equal, balanced or block counts "
                          "per virtual stage such as 3,1") from None
    check_partition(blocks, cfg.n_layers, pp, virtual)
    return blocks


__all__ = ["ChunkCost", "PartitionReport", "partition", "partition_blocks", "balanced_blocks",
           "resolve_partition", "unit_flops"]
