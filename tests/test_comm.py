"""Comm semantics on the in-process thread world (the same checks run under MPI in tests/mpi/).

Also what only the thread world promises: a failing rank is an exception in the caller within
moments, a deadlock is a clear error after ``timeout``, and collectives mismatched across ranks
are reported instead of hanging.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import accounting_cases
import comm_cases
from minipar.dist.comm import (CommAborted, CommDeadlock, CommError, ThreadComm, local_comm,
                               run_threads)
from minipar.dist.assertions import assert_allclose_collective, collective_assert

CASES = comm_cases.CASES + accounting_cases.CASES
SIZES = (1, 2, 4)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_shared_case_on_threads(case, size):
    comm_cases.run_case(case, size)


def test_cases_cover_the_interface():
    names = {c.name for c in CASES}
    for needed in ("allreduce", "allreduce_inplace", "allgather", "reduce_scatter", "broadcast",
                   "p2p_order", "isend_irecv", "split", "size_one", "stats_exact",
                   "argument_errors", "call_mismatch", "results_are_private", "mesh_layouts"):
        assert needed in names


def test_results_in_rank_order_and_repr():
    out = run_threads(lambda comm: (comm.rank, repr(comm), comm.size), 3)
    assert out == [(r, f"ThreadComm(world, rank {r} of 3)", 3) for r in range(3)]
    solo = local_comm("tp")
    assert (solo.rank, solo.size, solo.describe()) == (0, 1, "ThreadComm(tp, rank 0 of 1)")
    assert isinstance(solo, ThreadComm)


def test_failing_rank_surfaces_fast_with_its_rank():
    def fn(comm):
        if comm.rank == 2:
            time.sleep(0.05)  # the others are already blocked when this rank fails
            raise ValueError("rank two broke")
        if comm.rank == 1:
            comm.recv(3, "float64", source=0)  # blocked in a receive that will never come
        comm.allreduce(np.ones(4))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="rank two broke") as info:
        run_threads(fn, 4, timeout=60)
    assert time.perf_counter() - t0 < 5
    assert any("rank 2" in note for note in info.value.__notes__)


def test_first_original_error_wins_over_aborts():
    def fn(comm):
        if comm.rank == 0:
            raise KeyError("first")
        time.sleep(0.2)
        comm.barrier()  # fails with CommAborted, which must not replace the KeyError
    with pytest.raises(KeyError, match="first"):
        run_threads(fn, 3)


def test_other_ranks_see_comm_aborted():
    seen = []

    def fn(comm):
        if comm.rank == 0:
            raise RuntimeError("boom")
        try:
            comm.allgather(np.ones(2))
        except CommAborted as exc:
            seen.append(str(exc))
            raise
    with pytest.raises(RuntimeError, match="boom"):
        run_threads(fn, 3)
    assert len(seen) == 2 and all("rank 0 failed" in s and "boom" in s for s in seen)


def test_deadlock_raises_after_timeout():
    t0 = time.perf_counter()
    pattern = r"ThreadComm\(world, rank \d of 2\): recv\(source=\d, tag=0\).*\(deadlock\?\)"
    with pytest.raises(CommDeadlock, match=pattern):
        run_threads(lambda comm: comm.recv(3, "float64", source=1 - comm.rank), 2, timeout=0.3)
    assert time.perf_counter() - t0 < 5


def test_deadlock_message_names_op_and_group():
    def fn(comm):
        sub = comm.split(0, comm.rank, "dp")
        if comm.rank == 0:
            sub.allreduce(np.ones(2))  # rank 1 never joins, but stays alive
        else:
            time.sleep(0.5)
    with pytest.raises(CommDeadlock) as info:
        run_threads(fn, 2, timeout=0.2)
    msg = str(info.value)
    assert "allreduce" in msg and "ThreadComm(dp, rank 0 of 2)" in msg and "deadlock?" in msg


def test_waiting_on_a_returned_rank_fails_at_once():
    def fn(comm):
        if comm.rank == 0:
            comm.barrier()
    t0 = time.perf_counter()
    with pytest.raises(CommDeadlock, match="already returned"):
        run_threads(fn, 2, timeout=60)
    assert time.perf_counter() - t0 < 5


def test_collective_assert_fails_everywhere_naming_ranks():
    raised = []

    def fn(comm):
        try:
            collective_assert(comm, comm.rank not in (1, 3), f"bad value on {comm.rank}")
        except AssertionError as exc:
            raised.append(str(exc))
            raise
    with pytest.raises(AssertionError, match=r"rank\(s\) 1, 3"):
        run_threads(fn, 4)
    assert len(raised) == 4 and all("rank 3: bad value on 3" in m for m in raised)


def test_assert_allclose_collective():
    def fn(comm):
        x = np.array([1.0, 2.0]) + (1e-3 if comm.rank == 1 else 0.0)
        assert_allclose_collective(comm, x, np.array([1.0, 2.0]), rtol=1e-9, what="weights")
    with pytest.raises(AssertionError, match="rank 1: weights not close"):
        run_threads(fn, 2)
    run_threads(lambda c: assert_allclose_collective(c, np.ones(3), np.ones(3), rtol=0), 2)


def test_assertion_bookkeeping_is_not_counted():
    def fn(comm):
        collective_assert(comm, True, "")
        return comm.stats.as_dict()
    assert run_threads(fn, 2) == [{}, {}]


def test_bad_world_size():
    with pytest.raises(ValueError, match="positive"):
        run_threads(lambda c: None, 0)


def test_split_with_uneven_groups_and_mismatch_error_text():
    def fn(comm):
        sub = comm.split(0 if comm.rank == 0 else 1, 0, "g")
        if comm.rank == 0:
            return sub.size
        n = 2 if sub.rank == 0 else 3
        try:
            sub.allreduce(np.zeros(n))
        except CommError as exc:
            return str(exc)
    out = run_threads(fn, 3)
    assert out[0] == 1
    assert out[1].startswith("ThreadComm(g, rank 0 of 2): rank 1 disagrees with rank 0")
    assert out[1].split(": ", 1)[1] == out[2].split(": ", 1)[1]  # the same report on both ranks
    assert "rank 0: allreduce((2,), <f8, sum); rank 1: allreduce((3,), <f8, sum)" in out[1]
