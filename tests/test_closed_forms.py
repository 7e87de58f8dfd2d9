"""Two numbers checked against an independent computation instead of against another layout.

Comparing layouts cannot catch a bug in code every layout shares: the evaluation metric and the
fixed position table are computed once, the same way, whatever the layout. Each test here
recomputes its number from its definition.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.comm import local_comm
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.nn import functional as F
from minipar.tasks import IGNORE, make_task


def _exact_match_by_hand(batches, predict) -> tuple[float, int]:
    """(fraction of rows right at every scored position, rows right at only some of them)."""
    right = partly = rows = 0
    for inputs, targets in batches:
        preds = predict(inputs)
        for pred_row, target_row in zip(preds.tolist(), targets.tolist()):
            hits = [p == t for p, t in zip(pred_row, target_row) if t != IGNORE]
            right += all(hits)
            partly += any(hits) and not all(hits)
            rows += 1
    return right / rows, partly


def test_exact_match_is_every_answer_token_right():
    """Engine.evaluate's exact match equals the definition, on a model that is partly right
    (so counting a row with any right token, or averaging tokens, would give other numbers)."""
    task = make_task("sort", 0, n_digits=4, eval_size=96)
    cfg = ModelConfig(vocab_size=task.vocab_size, seq_len=task.seq_len, n_layers=1,
                      d_model=32, n_heads=2)
    engine = Engine(cfg, ParallelConfig(), Mesh(local_comm(), dp=1, tp=1, pp=1),
                    dtype="float64", lr=2e-2)
    for step in range(25):  # about 1 row in 5 right, most others partly
        x, y = task.batch(step, 32)
        engine.train_step(x, y, task.n_scored(y))
    batches = list(task.eval_batches(40))  # 96 rows: batches of 40, 40 and 16
    got = engine.evaluate(batches)["exact_match"]
    want, partly = _exact_match_by_hand(
        batches, lambda x: np.asarray(engine.forward_only(x)[0]))
    assert partly >= 5 and 0 < want < 1, (want, partly)  # the test can tell .all from .any
    assert got == pytest.approx(want, abs=1e-12)


def _table_by_hand(t: int, c: int) -> np.ndarray:
    """Vaswani et al. 2017, section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/c)),
    PE(pos, 2i+1) = cos(pos / 10000^(2i/c)), one scalar at a time."""
    pe = np.zeros((t, c))
    for pos in range(t):
        for j in range(c):
            angle = pos / 10000 ** ((j - j % 2) / c)
            pe[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return pe


@pytest.mark.parametrize("t, c", [(1, 2), (7, 6), (64, 32), (50, 9), (300, 64)])
def test_sinusoidal_table_is_the_closed_form_everywhere(t, c):
    np.testing.assert_allclose(F.sinusoidal_positions(t, c), _table_by_hand(t, c),
                               rtol=0, atol=1e-12)


def test_the_model_adds_the_closed_form_positions():
    from minipar.models.gpt import Embedding
    from minipar.nn.module import BuildContext

    cfg = ModelConfig(vocab_size=11, seq_len=24, d_model=16, n_heads=2, pos="sinusoidal")
    emb = Embedding(BuildContext(0, "float64", local_comm()), cfg)
    ids = np.random.default_rng(0).integers(0, 11, size=(3, 24))
    positions = np.asarray(emb.forward(ids, mb=0)) - np.asarray(emb.tok.forward(ids, mb=1))
    for row in positions:  # (T, C) per sequence
        np.testing.assert_allclose(row, _table_by_hand(24, 16), rtol=0, atol=1e-12)
