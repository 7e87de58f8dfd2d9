"""The training modes on the real GPT: synchronous mode equals the data-parallel engine, and a
recorded parameter-server run of the GPT replays to its serial reference bit for bit."""

from __future__ import annotations

import numpy
import pytest

from minipar import backend
from minipar.config import ConfigError, ModelConfig, ParallelConfig
from minipar.dist.comm import run_threads
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.modes import Replica, run_mode
from minipar.parallel.param_server import replay_reference
from minipar.tasks import make_task

CFG = ModelConfig(vocab_size=12, seq_len=17, d_model=16, n_heads=2, n_layers=1)
BATCH, STEPS, LR = 4, 3, 1e-2


def task():
    return make_task("sort", seed=0, n_digits=8)


def replica(workers: int) -> Replica:
    return Replica(CFG, task(), BATCH, workers, seed=1, dtype="float64")


def test_sync_mode_equals_the_data_parallel_engine():
    def rank(comm):
        r = run_mode("sync", comm, replica(comm.size), STEPS, LR, optimizer="adamw")
        return backend.to_host(r.weights)

    got = run_threads(rank, 2)[0]

    def engine_rank(comm):  # the real engine: dp 2, AdamW, no clipping
        eng = Engine(CFG, ParallelConfig(dp=2), Mesh(comm, dp=2), seed=1, dtype="float64",
                     optimizer="adamw", lr=LR, grad_clip=0.0)
        t = task()
        for k in range(STEPS):
            x, y = t.dp_rows(k, BATCH, eng.mesh.dp_rank, 2)
            eng.train_step(x, y, t.n_scored(y) * 2)
        return numpy.concatenate([backend.to_host(p.data).ravel() for p in eng.params])

    want = run_threads(engine_rank, 2)[0]
    numpy.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_a_recorded_gpt_run_replays_to_its_serial_reference():
    free = run_threads(lambda c: run_mode("ssp", c, replica(2), STEPS, LR, staleness=1,
                                          optimizer="adamw"), 3)
    order = free[0].order
    ref_replica = replica(2)
    want = replay_reference(ref_replica.weights(), ref_replica.gradient, order, 2, LR,
                            optimizer="adamw")
    numpy.testing.assert_array_equal(backend.to_host(free[0].weights), backend.to_host(want))


def test_bad_mode_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="--mode"):
        run_threads(lambda c: run_mode("hogwild", c, replica(1), 1, LR), 1)
    with pytest.raises(ConfigError, match="--staleness"):
        run_threads(lambda c: run_mode("ssp", c, replica(1), 1, LR), 2)
