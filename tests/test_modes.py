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


# ------------------------------------------------------------------ the command line
TINY = ["--model", "tiny", "--steps", "4", "--batch-size", "12", "--quiet", "--threads", "1"]


@pytest.mark.parametrize("mode", [["--mode", "ps"], ["--mode", "ssp", "--staleness", "1"],
                                  ["--mode", "local-sgd", "--sync-every", "2"],
                                  ["--mode", "sync", "--straggler", "1:2"]])
def test_every_mode_trains_from_the_command_line(mode, tmp_path):
    import json

    import inproc

    summary = tmp_path / "s.json"
    codes, out, err = inproc.train(TINY + mode + ["--summary", str(summary)], n=3)
    assert codes == [0, 0, 0], err
    data = json.loads(summary.read_text())
    if mode[1] != "sync":
        assert data["mode"] == mode[1] and len(data["ranks"]) == 3
        assert "done    |" in out and "rank 2  |" in out


@pytest.mark.parametrize("flags, says", [
    (["--mode", "ssp", "--staleness", "-1"], "--staleness must be >= 0"),
    (["--mode", "local-sgd", "--sync-every", "0"], "--sync-every must be >= 1"),
    (["--mode", "ssp"], "--mode ssp needs --staleness"),
    (["--mode", "ps", "--servers", "3"], "needs more ranks than servers"),
    (["--mode", "ps", "--tp", "3"], "--mode ps trains whole replicas"),
    (["--mode", "ps", "--save", "ck"], "without --save"),
    (["--staleness", "2"], "--staleness applies to --mode ssp"),
    (["--mode", "ps", "--straggler", "7:2"], "--straggler"),
    (["--mode", "ps", "--batch-size", "7"], "must divide over the 2 worker(s)"),
])
def test_bad_mode_flags_are_one_line_on_every_rank(flags, says):
    import inproc

    codes, out, err = inproc.train(TINY + flags, n=3)
    assert codes == [2, 2, 2]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in err, err
