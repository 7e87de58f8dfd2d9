"""Semantic tests of ``Comm``, written once and run in both worlds.

Each ``check_*`` runs on every rank of a communicator and asserts collectively (every rank
learns every verdict, so a failure under MPI cannot strand the other ranks). ``tests/test_comm.py``
runs them on ``run_threads`` worlds of 1, 2 and 4 ranks; ``tests/mpi/test_comm_mpi.py`` runs
them under ``mpirun -n 2`` and ``-n 4``. Hypothesis draws the parameters; the data of rank q is
a pure function of (seed, q), so every rank can compute the expected answer of the whole group.
Values are small integers (also in float dtypes), so sums are exact in any order and results
can be compared exactly, whatever algorithm MPI picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minipar import backend
from minipar.dist.comm import CommError, Request, run_threads
from minipar.dist.assertions import collective_assert

DTYPES = ("float32", "float64", "int64")
LAYOUTS = ("contiguous", "strided", "fortran")


@dataclass(frozen=True)
class Case:
    fn: Callable  # fn(comm, **params)
    params: st.SearchStrategy | None  # draws the keyword arguments (None: run once)
    examples: int

    @property
    def name(self) -> str:
        return self.fn.__name__.removeprefix("check_")


CASES: list[Case] = []


def case(examples: int = 8, **params: st.SearchStrategy):
    """Register a check; ``params`` are strategies for its keyword arguments."""
    def register(fn):
        CASES.append(Case(fn, st.fixed_dictionaries(params) if params else None, examples))
        return fn
    return register


# ---- data and assertions ----

def rank_data(rank: int, shape: tuple, dtype: str, seed: int) -> np.ndarray:
    values = np.random.default_rng([seed, rank]).integers(-20, 21, size=shape)
    return np.asarray(values).astype(dtype)  # an array even for shape ()


def laid_out(a: np.ndarray, layout: str):
    """The values of host array ``a`` on the backend's device, in a contiguous, strided (every
    other element) or F-order array."""
    xp, a = backend.xp(), backend.from_host(a)
    if layout == "strided" and a.ndim:
        big = xp.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if layout == "fortran":
        return xp.asfortranarray(a)
    return a


def reduced(arrays: list[np.ndarray], op: str) -> np.ndarray:
    stacked = np.stack(arrays)
    if op == "max":
        return np.asarray(stacked.max(axis=0))
    total = np.asarray(stacked.sum(axis=0, dtype=stacked.dtype))
    return np.asarray(total / len(arrays)) if op == "avg" else total


def _brief(a) -> str:
    if not isinstance(a, (np.ndarray, backend.xp().ndarray)):
        return f"{type(a).__name__} {a!r:.60}"
    a = backend.to_host(a)
    return f"{a.shape} {a.dtype} {np.array2string(a.reshape(-1)[:6])}"


def assert_same(comm, got, want: np.ndarray, what: str) -> None:
    """``got``, an array of the backend (a device array on a GPU), equals host array ``want``."""
    host = backend.to_host(got) if isinstance(got, backend.xp().ndarray) else None
    ok = (host is not None and host.shape == want.shape and host.dtype == want.dtype
          and np.array_equal(host, want))
    collective_assert(comm, ok, f"{what}: got {_brief(got)}, want {_brief(want)}")


def raised(exc_type: type, fn: Callable) -> BaseException | None:
    """The exception ``fn()`` raised if it is an ``exc_type``, else None."""
    try:
        fn()
    except exc_type as exc:
        return exc
    return None


def assert_raises(comm, exc_type: type, fn: Callable, what: str, *needles: str) -> None:
    exc = raised(exc_type, fn)
    ok = exc is not None and all(n in str(exc) for n in needles)
    collective_assert(comm, ok, f"{what}: expected {exc_type.__name__} mentioning {needles}, "
                                f"got {exc!r}")


def axis_from(seed: int, ndim: int) -> int:
    """An axis in [-ndim, ndim): negative axes are drawn as often as positive ones."""
    return seed % (2 * ndim) - ndim


shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)
shapes_1d_up = st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple)
seeds = st.integers(0, 2**16)


# ---- collectives ----

@case(examples=12, shape=shapes, dtype=st.sampled_from(DTYPES), op=st.sampled_from(
    ("sum", "avg", "max")), layout=st.sampled_from(LAYOUTS), seed=seeds)
def check_allreduce(comm, shape, dtype, op, layout, seed):
    p, r = comm.size, comm.rank
    data = [rank_data(q, shape, dtype, seed) for q in range(p)]
    x = laid_out(data[r].copy(), layout)
    if op == "avg" and dtype == "int64":
        assert_raises(comm, CommError, lambda: comm.allreduce(x, op), "int avg", "floating")
        return
    got = comm.allreduce(x, op)
    assert_same(comm, got, reduced(data, op), f"allreduce {op}")
    assert_same(comm, x, data[r], "allreduce leaves its input alone")
    collective_assert(comm, (got is x) == (p == 1), "a group of one returns x itself, others a "
                                                    "new array")


@case(examples=10, shape=shapes, dtype=st.sampled_from(DTYPES),
      op=st.sampled_from(("sum", "avg", "max")), seed=seeds)
def check_allreduce_inplace(comm, shape, dtype, op, seed):
    p, r = comm.size, comm.rank
    data = [rank_data(q, shape, dtype, seed) for q in range(p)]
    doubled = [np.asarray(2 * d) for d in data]  # asarray: 0-d arithmetic gives scalars
    x, y, z = (backend.from_host(a.copy()) for a in (data[r], doubled[r], data[r]))
    if op == "avg" and dtype == "int64":
        assert_raises(comm, CommError, lambda: comm.allreduce_(x, op), "int avg", "floating")
        return
    # Two non-blocking reductions in flight at once, finished in the opposite order.
    first, second = comm.iallreduce_(x, op), comm.iallreduce_(y, op)
    collective_assert(comm, second.wait() is None and first.wait() is None, "wait() -> None")
    collective_assert(comm, first.wait() is None and first.done, "waiting twice is harmless")
    comm.allreduce_(z, op)
    assert_same(comm, x, reduced(data, op), f"iallreduce_ {op}")
    assert_same(comm, y, reduced(doubled, op), f"second iallreduce_ {op}")
    assert_same(comm, z, reduced(data, op), f"allreduce_ {op}")
    if len(shape) and shape[-1] > 1 and np.prod(shape) > 1:
        strided = laid_out(data[r].copy(), "strided")
        assert_raises(comm, CommError, lambda: comm.allreduce_(strided), "in place, strided",
                      "contiguous")


@case(examples=12, shape=shapes_1d_up, axis_seed=st.integers(0, 5),
      dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), seed=seeds)
def check_allgather(comm, shape, axis_seed, dtype, layout, seed):
    p, r = comm.size, comm.rank
    axis = axis_from(axis_seed, len(shape))
    data = [rank_data(q, shape, dtype, seed) for q in range(p)]
    x = laid_out(data[r].copy(), layout)
    got = comm.allgather(x, axis=axis)
    assert_same(comm, got, np.concatenate(data, axis=axis), f"allgather axis={axis}")
    collective_assert(comm, (got is x) == (p == 1), "allgather: x itself only for one rank")


@case(examples=12, shape=shapes_1d_up, axis_seed=st.integers(0, 5),
      dtype=st.sampled_from(DTYPES), op=st.sampled_from(("sum", "avg", "max")),
      layout=st.sampled_from(LAYOUTS), seed=seeds)
def check_reduce_scatter(comm, shape, axis_seed, dtype, op, layout, seed):
    p, r = comm.size, comm.rank
    axis = axis_from(axis_seed, len(shape))
    full = list(shape)
    full[axis] *= p
    data = [rank_data(q, tuple(full), dtype, seed) for q in range(p)]
    x = laid_out(data[r].copy(), layout)
    if op == "avg" and dtype == "int64":
        assert_raises(comm, CommError, lambda: comm.reduce_scatter(x, axis, op), "int avg",
                      "floating")
        return
    got = comm.reduce_scatter(x, axis=axis, op=op)
    want = np.split(reduced(data, op), p, axis=axis)[r]
    assert_same(comm, got, want, f"reduce_scatter {op} axis={axis}")
    if p > 1:
        full[axis] += 1  # now p * k + 1: not divisible
        odd = np.zeros(full, dtype)
        assert_raises(comm, CommError, lambda: comm.reduce_scatter(odd, axis=axis),
                      "reduce_scatter of a non-divisible axis", str(full[axis]), str(p))


@case(examples=10, shape=shapes, dtype=st.sampled_from(DTYPES), root_seed=st.integers(0, 7),
      layout=st.sampled_from(LAYOUTS), seed=seeds)
def check_broadcast(comm, shape, dtype, root_seed, layout, seed):
    p, r = comm.size, comm.rank
    root = root_seed % p
    mine = rank_data(r, shape, dtype, seed) if r == root else np.zeros(shape, dtype)
    x = laid_out(mine, layout)
    got = comm.broadcast(x, root=root)
    assert_same(comm, got, rank_data(root, shape, dtype, seed), f"broadcast from {root}")
    collective_assert(comm, (got is x) == (r == root), "broadcast: the root gets x itself")


def check_results_are_private(comm):
    """Each rank owns its results: changing one in place must not show up on another rank."""
    p, r = comm.size, comm.rank

    def x():  # a fresh input per call: a group of one returns the input itself
        return backend.from_host(np.arange(8.0).reshape(4, 2) * (r + 1))  # (4, 2)
    results = {"allreduce": comm.allreduce(x()), "allgather": comm.allgather(x(), 1),
               "broadcast": comm.broadcast(x() if r == 0 else x() * 0, 0)}
    if p in (1, 2, 4):
        results["reduce_scatter"] = comm.reduce_scatter(x())
    wants = {k: backend.to_host(v).copy() for k, v in results.items()}
    for v in results.values():
        v += 1000 * (r + 1)
    comm.barrier()
    for k, v in results.items():
        assert_same(comm, v, wants[k] + 1000 * (r + 1), f"{k} result private to its rank")


CASES.append(Case(check_results_are_private, None, 1))


# ---- point to point ----

@case(examples=6, n_msgs=st.integers(1, 6), seed=seeds)
def check_p2p_order(comm, n_msgs, seed):
    """Per (source, tag) messages arrive in send order; different tags are independent."""
    p, r = comm.size, comm.rank
    if p == 1:
        assert_raises(comm, CommError, lambda: comm.send(np.zeros(2), 0), "send to self", "peer")
        return
    right, left = (r + 1) % p, (r - 1) % p

    def message(src, i):
        return rank_data(src, (i + 1,), "float64", seed + i)  # (i + 1,): sizes tell them apart

    sends = [comm.isend(message(r, i), right, tag=i % 2) for i in range(n_msgs)]
    got = {}
    for tag in (1, 0):  # tag 1 first: tag 0 messages wait in their own queue meanwhile
        for i in range(tag, n_msgs, 2):
            got[i] = comm.recv((i + 1,), "float64", left, tag=tag)
    Request.waitall(sends)
    for i in range(n_msgs):
        assert_same(comm, got[i], message(left, i), f"message {i} (tag {i % 2}) from {left}")
    comm.send(np.full(3, r, "int64"), right)  # small and blocking: no deadlock
    assert_same(comm, comm.recv(3, "int64", left), np.full(3, left, "int64"), "blocking send")


def check_isend_irecv(comm):
    """Receives posted before the sends match in posting order; waits may come in any order."""
    p, r = comm.size, comm.rank
    if p == 1:
        return
    right, left = (r + 1) % p, (r - 1) % p
    first = comm.irecv((2, 3), "float32", left, tag=5)
    second = comm.irecv((4,), "int64", left, tag=5)
    comm.isend(np.full((2, 3), r, "float32"), right, tag=5).wait()
    comm.isend(np.arange(4) + 10 * r, right, tag=5).wait()
    assert_same(comm, second.wait(), np.arange(4) + 10 * left, "second irecv")
    assert_same(comm, first.wait(), np.full((2, 3), left, "float32"), "first irecv")
    collective_assert(comm, first.done and second.done, "requests report done")


CASES.append(Case(check_isend_irecv, None, 1))


# ---- groups ----

@case(examples=6, colors=st.integers(1, 4))
def check_split(comm, colors):
    p, r = comm.size, comm.rank
    k = min(colors, p)
    color = r % k
    members = [q for q in range(p) if q % k == color]
    order = sorted(members, key=lambda q: (-q, q))  # key = -rank: reversed order
    sub = comm.split(color, -r, f"c{color}")
    collective_assert(comm, (sub.size, sub.rank, sub.name) == (len(members), order.index(r),
                                                               f"c{color}"),
                      f"split: got {sub!r}, want rank {order.index(r)} of {len(members)}")
    collective_assert(comm, sub.allgather_obj(r) == order, "split: group ordered by key")
    total = sub.allreduce(backend.from_host(np.array([r], "int64")))
    assert_same(comm, total, np.array([sum(members)], "int64"), "allreduce inside the group")
    inner = sub.split(0, sub.rank, "inner")
    collective_assert(comm, inner.allgather_obj(r) == order, "split of a split")


def check_size_one(comm):
    """A group of one: every collective returns x itself and records nothing."""
    solo = comm.split(comm.rank, 0, "solo")
    x = laid_out(np.arange(6.0).reshape(2, 3), "strided")
    obj = {"rank": comm.rank}
    same = [solo.allreduce(x) is x, solo.allreduce(x, "avg") is x, solo.allgather(x, -1) is x,
            solo.reduce_scatter(x, 1) is x, solo.broadcast(x) is x,
            solo.bcast_obj(obj) is obj, solo.allgather_obj(obj)[0] is obj]
    y = backend.from_host(np.arange(3.0))
    solo.allreduce_(y)
    solo.iallreduce_(y, "avg").wait()
    solo.barrier()
    ok = (all(same) and np.array_equal(backend.to_host(y), np.arange(3.0))
          and solo.stats.as_dict() == {})
    collective_assert(comm, ok, f"size one: identities {same}, stats {solo.stats.as_dict()}")


CASES.append(Case(check_size_one, None, 1))


def check_call_mismatch(comm):
    """Ranks that disagree on a call get the same CommError everywhere, and the group survives."""
    if comm.size == 1:
        return
    collective_assert(comm, comm.check, f"{comm!r} must compare calls (MPIComm(check=True))")
    n = 3 if comm.rank == 0 else 4
    assert_raises(comm, CommError, lambda: comm.allreduce(np.zeros(n)), "shape", "disagree")
    if comm.rank == 0:
        bad = lambda: comm.allreduce(np.zeros(2))  # noqa: E731
    else:
        bad = lambda: comm.allgather(np.zeros(2))  # noqa: E731
    assert_raises(comm, CommError, bad, "op", "disagree", "allreduce", "allgather")
    assert_same(comm, comm.allreduce(np.ones(2)), np.full(2, float(comm.size)), "still usable")


CASES.append(Case(check_call_mismatch, None, 1))


def run_case(case: Case, size: int) -> None:
    """Run one shared check on a thread world of ``size`` ranks, drawing its parameters."""
    if case.params is None:
        run_threads(case.fn, size, timeout=30)
        return

    @settings(max_examples=case.examples, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(params=case.params)
    def prop(params):
        run_threads(lambda comm: case.fn(comm, **params), size, timeout=30)
    prop()
