"""How the model is cut into pipeline stages, and what each stage costs: the partition report.

minipar splits the blocks into ``pp x virtual_stages`` contiguous chunks of equal block counts
(``minipar.models.gpt.chunk_specs``, the single source of the split); the embedding goes with the
first chunk, the final LayerNorm, LM head and loss with the last. Rank s holds global chunks
s, s + pp, ... (interleaving, Narayanan et al. 2021). Equal block counts are not equal work:
the first stage also looks up embeddings (no FLOPs, many parameters) and the last computes the
logits over the vocabulary (2 b s h V FLOPs). The report shows both per stage, so the slowest
stage, which sets the pace of the whole pipeline, is visible before a run starts.

Counts are for the full (unsharded) model: a tensor-parallel rank holds about 1/tp of them.
FLOPs are per sequence and training step: forward plus backward, 3 x the forward's
matrix-multiply FLOPs (Korthikanti et al. 2022, eq. 7), from ``minipar.sim.costmodel``.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipar.config import ModelConfig
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

    def lines(self) -> list[str]:
        """One line per stage, then one on balance (what the train banner prints)."""
        total_p = sum(c.params for c in self.chunks)
        total_f = sum(c.flops for c in self.chunks)
        width = len(str(self.pp - 1))
        out = []
        for s in range(self.pp):
            parts = "; ".join(
                (f"chunk {c.index}: " if self.virtual > 1 else "") + c.describe()
                for c in self.stage_chunks(s))
            p, f = self.stage_params(s), self.stage_flops(s)
            out.append(f"stage {s:>{width}} | {parts}: {p:,} params ({100 * p / total_p:.0f}%), "
                       f"{_fmt_flops(f)}/seq ({100 * f / total_f:.0f}%)")
        line = f"balance | slowest stage {self.imbalance:.2f}x the mean FLOPs"
        if self.virtual == 1 and self.pp > 1:
            best = balanced_blocks(self.cfg, self.pp)
            equal = [c.n_layers for c in self.chunks]
            if best != equal:
                alt = partition_blocks(self.cfg, best)
                line += (f"; blocks split {best} would give {alt.imbalance:.2f}x "
                         "(minipar splits blocks equally)")
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


def partition(cfg: ModelConfig, pp: int, virtual: int = 1) -> PartitionReport:
    """The report of the split minipar runs: ``chunk_specs`` for every stage."""
    chunks = []
    for s in range(pp):
        for spec in chunk_specs(cfg, pp, virtual, s):
            chunks.append(_chunk(cfg, s, spec.index, spec.n_chunks, spec.first_layer,
                                 spec.n_layers))
    return PartitionReport(cfg, pp, virtual, tuple(chunks))


def partition_blocks(cfg: ModelConfig, blocks: list[int]) -> PartitionReport:
    """The report of any contiguous split, one chunk per stage, ``blocks[s]`` blocks on s."""
    if sum(blocks) != cfg.n_layers or min(blocks) < 0:
        raise ValueError(f"blocks {blocks} must be >= 0 and sum to the {cfg.n_layers} layers")
    chunks, first = [], 0
    for s, n in enumerate(blocks):
        chunks.append(_chunk(cfg, s, s, len(blocks), first, n))
        first += n
    return PartitionReport(cfg, len(blocks), 1, tuple(chunks))


def balanced_blocks(cfg: ModelConfig, pp: int) -> list[int]:
    """Blocks per stage (each >= 1) minimising the slowest stage's FLOPs; ties keep it equal.

    Dynamic programming over contiguous splits: best[s][k] is the smallest possible maximum
    stage cost when the first k blocks go to stages 0..s-1. The first stage also pays the
    embedding and the last the head. Advice only: the model itself splits blocks equally.
    """
    n = cfg.n_layers
    if not 1 <= pp <= n:
        raise ValueError(f"need 1 <= pp <= layers, got pp={pp}, layers={n}")
    emb_f, block_f, head_f = unit_flops(cfg)

    def cost(s: int, k: int) -> float:
        return k * block_f + (emb_f if s == 0 else 0.0) + (head_f if s == pp - 1 else 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    choice = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for s in range(1, pp + 1):
        for k in range(s, n - (pp - s) + 1):
            for take in range(1, k - (s - 1) + 1):
                c = max(best[s - 1][k - take], cost(s - 1, take))
                # Prefer the split closest to equal among equally good ones.
                if c < best[s][k] or (c == best[s][k] and
                                      abs(take - n / pp) < abs(choice[s][k] - n / pp)):
                    best[s][k], choice[s][k] = c, take
    blocks, k = [], n
    for s in range(pp, 0, -1):
        blocks.append(choice[s][k])
        k -= choice[s][k]
    blocks.reverse()
    equal = [n // pp] * pp
    if n % pp == 0 and max(cost(s, b) for s, b in enumerate(equal)) <= best[pp][n]:
        return equal
    return blocks


__all__ = ["ChunkCost", "PartitionReport", "partition", "partition_blocks", "balanced_blocks",
           "unit_flops"]
