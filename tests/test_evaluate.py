"""Evaluation gives the serial metrics on every layout, even when dp does not divide a batch."""

import pytest

from minipar.config import ModelConfig, ParallelConfig
from minipar.tasks import make_task
from minipar.dist.comm import run_threads
from minipar.dist.mesh import Mesh
from minipar.engine import Engine

TASK = make_task("sort", 0, n_digits=4)
CFG = ModelConfig(vocab_size=TASK.vocab_size, seq_len=TASK.seq_len, n_layers=2, d_model=16,
                  n_heads=2)
BATCHES = [TASK.batch(0, 5), TASK.batch(1, 3), TASK.batch(2, 1)]  # 1 row: most dp ranks pad


def metrics(par: ParallelConfig) -> dict:
    def fn(world):
        engine = Engine(CFG, par, Mesh(world, dp=par.dp, tp=par.tp, pp=par.pp), dtype="float64")
        x, y = TASK.batch(7, 8)  # one step so that predictions are not all alike
        rows = 8 // par.dp
        lo = engine.mesh.dp_rank * rows
        engine.train_step(x[lo:lo + rows], y[lo:lo + rows], TASK.n_scored(y), lr=0.05)
        return engine.evaluate(BATCHES)
    out = run_threads(fn, par.world)
    assert all(o == out[0] for o in out)  # every rank reports the same numbers
    return out[0]


@pytest.mark.parametrize("par", [
    ParallelConfig(dp=4, zero=3),
    ParallelConfig(dp=2, tp=2, sequence_parallel=True),
    ParallelConfig(dp=2, pp=2, microbatches=2),
    ParallelConfig(pp=2, schedule="interleaved", microbatches=2, virtual_stages=1),
])
def test_evaluation_equals_serial(par):
    serial = metrics(ParallelConfig())
    got = metrics(par)
    assert got["exact_match"] == serial["exact_match"]
    assert got["loss"] == pytest.approx(serial["loss"], rel=1e-9)
