"""Shared cases of the encoder-decoder's parallel tests (thread world and mpirun): packed
batches with padded sources, and the check that a layout equals the serial run."""

from __future__ import annotations

import numpy as np

from minipar.compare import mismatches, serial_reference, train_layout
from minipar.config import ModelConfig, ParallelConfig
from minipar.models.encdec import PAD
from minipar.tasks import IGNORE


def encdec_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=11, seq_len=4, src_len=4, n_layers=2, d_model=16, n_heads=4,
                arch="encdec")
    return ModelConfig(**{**base, **kw})


def encdec_batches(cfg: ModelConfig, steps: int, batch: int, seed: int = 0) -> list:
    """Global batches of packed ids (B, S + T): sources of random lengths padded on the right,
    random decoder inputs, targets with some positions ignored (the last always scored)."""
    rng = np.random.default_rng(seed)
    s, t, v = cfg.src_len, cfg.seq_len, cfg.vocab_size
    out = []
    for _ in range(steps):
        src = rng.integers(1, v, (batch, s))
        lengths = rng.integers(1, s + 1, batch)
        src[np.arange(s)[None, :] >= lengths[:, None]] = PAD
        x = np.concatenate([src, rng.integers(0, v, (batch, t))], axis=1)
        y = rng.integers(0, v, (batch, t))
        y[rng.random((batch, t)) < 0.2] = IGNORE
        y[:, -1] = rng.integers(0, v, batch)
        out.append((x, y))
    return out


def layout_mismatches(world, cfg: ModelConfig, par: ParallelConfig, rows: int, seed: int,
                      rtol: float = 1e-9) -> list[str]:
    """Train 2 AdamW steps in ``par`` on this world and compare losses, full gradients and
    updated weights with the serial run computed here ([] when they agree)."""
    batches = encdec_batches(cfg, 2, par.dp * par.microbatches * rows, seed)
    result = train_layout(world, cfg, par, batches, seed=seed)
    return mismatches(result, serial_reference(cfg, batches, seed=seed), rtol)
