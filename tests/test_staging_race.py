"""The host -> device staging race, reproduced on the asynchronous stand-in device.

On a GPU, ``dst.set(pinned)`` only queues the copy, and CuPy's pinned pool hands a just-freed
block to the next allocation of its size. Two staged receives in a row (stage 0 of 1F1B in its
drain, or GPipe's whole backward) then let MPI write the second message into the block the
first copy may not have read yet. The strict stand-in queues such copies and recycles pinned
blocks the same way (``minipar.backend.stream``), so the race shows on a CPU: as wrong values
when the copy runs after the rewrite, and as a reported ``StreamRace`` when the host rewrites
the source before it could know that the copy had finished. The MPI version of the end-to-end
test is in ``tests/mpi/test_backend_mpi.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from minipar import backend
from minipar.backend.strict import StrictArray
from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.comm import run_threads
from minipar.dist.staging import Staging
from minipar.dist.stats import CommStats


@pytest.fixture()
def strict():
    """The strict backend, with races recorded (``races.seen``) instead of raised."""
    before = backend.name()
    xp = backend.use("strict")
    races = backend.device().races
    races.record_only = True
    yield xp
    races.record_only = False
    backend.use(before)


def new_races(mark: int) -> list[str]:
    return backend.device().races.seen[mark:]


def test_two_staged_receives_in_a_row_each_keep_their_own_message(strict):
    """The smallest reproduction: what MPI does for two staged receives, then one kernel."""
    wire = Staging(CommStats(), direct=False)
    mark = len(backend.device().races.seen)
    got = []
    for message in (np.full(6, 1.0), np.full(6, 2.0)):
        buf, finish = wire.incoming((6,), np.float64)
        buf[...] = message  # MPI writes the message into the pinned buffer
        got.append(finish())  # queues the copy to the device; the buffer is dropped here
        del buf, finish
    total = got[0] + got[1]  # a kernel: the stream runs the copies queued before it
    backend.synchronize()
    assert type(total) is StrictArray
    assert np.array_equal(backend.to_host(got[0]), np.full(6, 1.0)), \
        f"the first receive holds {backend.to_host(got[0])}: it got the second message"
    assert not new_races(mark), new_races(mark)[0]


PIPELINES = [ParallelConfig(pp=4, schedule="1f1b", microbatches=8),
             ParallelConfig(pp=4, schedule="gpipe", microbatches=4),
             ParallelConfig(pp=2, dp=2, schedule="1f1b", microbatches=4, bucket_mb=1e-4)]


@pytest.mark.parametrize("par", PIPELINES, ids=["1f1b-p4-m8", "gpipe-p4-m4", "1f1b-dp2-bucket"])
def test_staged_pipeline_on_threads_equals_serial_without_races(strict, par):
    """1F1B's drain and GPipe's backward receive gradients back to back on stage 0."""
    cfg = ModelConfig(vocab_size=9, seq_len=4, n_layers=4, d_model=8, n_heads=2)
    batches = random_batches(cfg, steps=2, batch=8, seed=3)
    mark = len(backend.device().races.seen)
    run = run_threads(lambda w: train_layout(w, cfg, par, batches), par.world, staging=True)[0]
    races = new_races(mark)
    backend.use("numpy")
    try:
        bad = mismatches(run, serial_reference(cfg, batches), rtol=1e-9)
    finally:
        backend.use("strict")
    assert not races and not bad, (f"{len(races)} staging races, the first: "
                                   f"{races[:1]}; parallel != serial: {bad[:2]}")


def test_staged_thread_world_counts_copies_as_mpi_staging_does(strict):
    """The in-process world stages through the same Staging code: a send and a receive of n
    bytes record d2h n on the sender and h2d n on the receiver, as under MPI."""
    n = 5 * 8

    def body(w):
        if w.rank == 0:
            w.send(strict.arange(5.0), 1)
            return w.stats.copies_as_dict()
        x = w.recv((5,), np.float64, 0)
        return w.stats.copies_as_dict(), backend.to_host(x)

    sent, (received, x) = run_threads(body, 2, staging=True)
    assert np.array_equal(x, np.arange(5.0))
    assert (sent["d2h"]["calls"], sent["d2h"]["bytes"], set(sent)) == (1, n, {"d2h"})
    assert (received["h2d"]["calls"], received["h2d"]["bytes"], set(received)) == (1, n, {"h2d"})
