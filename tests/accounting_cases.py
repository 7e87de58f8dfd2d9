"""Checks of stats accounting, argument errors and the rank mesh, run in both worlds.

Like ``comm_cases.py``: every check runs on every rank and asserts collectively. The expected
byte counts below restate the accounting rules of ``minipar.dist.comm`` independently, so a
change to either side shows up here.
"""

from __future__ import annotations

import pickle
from itertools import product

import numpy as np
from hypothesis import strategies as st

from comm_cases import Case, assert_raises, raised, rank_data
from minipar import backend
from minipar.dist.comm import CommError
from minipar.dist.mesh import LayoutError, Mesh
from minipar.dist.assertions import collective_assert

CASES: list[Case] = []


def check_stats_exact(comm, rows, cols, dtype):
    p, r = comm.size, comm.rank
    acct = comm.split(0, r, "acct")  # a fresh group: its stats hold only what happens below
    x = backend.from_host(rank_data(r, (rows * p, cols), dtype, 7))
    nb = x.nbytes
    want: dict[str, list[int]] = {}

    def expect(op, nbytes, wire):
        calls, b, w = want.get(op, [0, 0, 0])
        want[op] = [calls + 1, b + nbytes, w + wire]

    acct.allreduce(x)
    acct.allreduce_(x.copy())
    z = x.copy()
    acct.iallreduce_(z, "max").wait()
    for _ in range(3):
        expect("allreduce", nb, 2 * (p - 1) * nb // p)
    acct.allgather(x, axis=1)
    expect("allgather", p * nb, (p - 1) * p * nb // p)
    acct.reduce_scatter(x, axis=0)
    expect("reduce_scatter", nb, (p - 1) * nb // p)
    acct.broadcast(x, root=p - 1)
    expect("broadcast", nb, nb)
    acct.barrier()
    expect("barrier", 0, 0)
    if p > 1:
        right, left = (r + 1) % p, (r - 1) % p
        sending = acct.isend(x, right, tag=1)
        acct.recv(x.shape, x.dtype, left, tag=1)
        sending.wait()
        receiving = acct.irecv(x.shape[0], x.dtype, left, tag=2)  # wrong shape, right size
        acct.send(x[:, 0].copy(), right, tag=2)
        receiving.wait()
        expect("send", nb, nb)
        expect("recv", nb, 0)
        expect("send", nb // cols, nb // cols)
        expect("recv", nb // cols, 0)
    obj = {"rank": r, "pad": "x" * r}
    acct.allgather_obj(obj)
    pickled = [len(pickle.dumps({"rank": q, "pad": "x" * q}, pickle.HIGHEST_PROTOCOL))
               for q in range(p)]
    expect("object", sum(pickled), sum(pickled))
    acct.bcast_obj(obj, root=0)
    expect("object", pickled[0], pickled[0])
    if p == 1:
        want = {}  # a group of one moves nothing and records nothing
    stats = acct.stats.as_dict()
    got = {op: [d["calls"], d["bytes"], d["wire_bytes"]] for op, d in stats.items()}
    collective_assert(comm, got == want, f"stats {got} != expected {want}")
    seconds_ok = all(isinstance(d["seconds"], float) and d["seconds"] >= 0
                     for d in stats.values())
    total = acct.stats.total()
    sums_ok = (total.calls, total.bytes, total.wire_bytes) == tuple(
        sum(v[i] for v in want.values()) for i in range(3))
    acct.stats.reset()
    collective_assert(comm, seconds_ok and sums_ok and acct.stats.as_dict() == {},
                      f"seconds {seconds_ok}, total {total}, reset {acct.stats.as_dict()}")


CASES.append(Case(check_stats_exact, st.fixed_dictionaries({
    "rows": st.integers(1, 3), "cols": st.integers(1, 4),
    "dtype": st.sampled_from(("float32", "float64", "int64"))}), 5))


def check_argument_errors(comm):
    """Bad calls raise CommError with a message naming the problem (the same on every rank)."""
    p, r = comm.size, comm.rank
    x = np.zeros((2, 3))
    for what, fn, needle in [
        ("op", lambda: comm.allreduce(x, op="min"), "op"),
        ("0-d allgather", lambda: comm.allgather(np.float64(1.0)), "at least one axis"),
        ("axis", lambda: comm.allgather(x, axis=2), "out of range"),
        ("negative axis", lambda: comm.reduce_scatter(x, axis=-3), "out of range"),
        ("root", lambda: comm.broadcast(x, root=p), "root"),
        ("object root", lambda: comm.bcast_obj(1, root=-1), "root"),
        ("dest", lambda: comm.send(x, dest=p), "peer"),
        ("self", lambda: comm.isend(x, dest=r), "peer"),
        ("source", lambda: comm.recv(3, "float64", source=-1), "peer"),
        ("color", lambda: comm.split(-1, 0, "bad"), "color"),
        ("in place on a list", lambda: comm.allreduce_([1.0, 2.0]), "contiguous"),
    ]:
        assert_raises(comm, CommError, fn, what, needle)
    if p > 1:
        assert_raises(comm, CommError, lambda: comm.send(x, (r + 1) % p, tag=-1), "tag", "tag")
        # A message of the wrong size fails on the receiver; the group stays usable.
        errors = []
        if r == 0:
            comm.send(np.arange(3.0), 1, tag=9)
            comm.send(np.arange(5.0), 1, tag=9)
        elif r == 1:
            errors = [raised(CommError, lambda: comm.recv(4, "float64", 0, tag=9))
                      for _ in ("short", "long")]
        ok = all(e is not None and "recv(source=0, tag=9)" in str(e) for e in errors)
        collective_assert(comm, ok, f"messages of the wrong size: {errors}")


CASES.append(Case(check_argument_errors, None, 1))


# ---- the mesh ----

def factorizations(n: int) -> list[tuple[int, int, int]]:
    """Every (dp, pp, tp) of positive ints with dp * pp * tp == n."""
    return [(dp, pp, n // (dp * pp)) for dp in range(1, n + 1) for pp in range(1, n + 1)
            if n % (dp * pp) == 0]


def check_mesh(world, dp, pp, tp):
    mesh = Mesh(world, dp=dp, pp=pp, tp=tp)
    r = world.rank
    coords = (mesh.dp_rank, mesh.pp_rank, mesh.tp_rank)
    collective_assert(world, r == (mesh.pp_rank * dp + mesh.dp_rank) * tp + mesh.tp_rank
                      and mesh.rank_of(*coords) == r, f"rank {r} at {coords}")
    everyone = world.allgather_obj(coords)
    collective_assert(world, sorted(everyone) == sorted(product(range(dp), range(pp), range(tp))),
                      f"coordinates must cover the grid once: {everyone}")
    d, s, t = coords
    groups = {"tp": [mesh.rank_of(d, s, i) for i in range(tp)],
              "dp": [mesh.rank_of(i, s, t) for i in range(dp)],
              "pp": [mesh.rank_of(d, i, t) for i in range(pp)]}
    collective_assert(world, groups["tp"] == list(range(r - t, r - t + tp)),
                      "a tp group is consecutive ranks")
    for name, members in groups.items():
        comm = getattr(mesh, name)
        got = comm.allgather_obj(r)
        collective_assert(world, got == members and comm.name == name
                          and members[comm.rank] == r, f"{name} group {got} != {members}")
    collective_assert(world, mesh.comms() == {"world": world, "dp": mesh.dp, "pp": mesh.pp,
                                              "tp": mesh.tp}, "comms()")
    stages = (mesh.is_first_stage, mesh.is_last_stage, mesh.prev_stage, mesh.next_stage)
    want = (s == 0, s == pp - 1, s - 1 if s else None, s + 1 if s < pp - 1 else None)
    collective_assert(world, stages == want, f"stage flags {stages} != {want}")
    collective_assert(world, mesh.describe() == f"DP({dp})-PP({pp})-TP({tp}) rank {r}",
                      mesh.describe())
    mesh.reset_stats()
    mesh.dp.allreduce(np.ones(2))
    keys = {"world"} | {g for g, n in (("dp", dp), ("pp", pp), ("tp", tp)) if n > 1}
    stats = mesh.stats()
    ok = set(stats) == keys and (dp == 1 or stats["dp"]["allreduce"]["calls"] == 1)
    collective_assert(world, ok, f"mesh.stats() {stats}")


def check_mesh_layouts(world):
    for dp, pp, tp in factorizations(world.size):
        check_mesh(world, dp, pp, tp)
    n = world.size
    assert_raises(world, LayoutError, lambda: Mesh(world, dp=n + 1), "bad layout",
                  f"dp x pp x tp = {n + 1} x 1 x 1 = {n + 1} does not equal the world size {n}")
    assert_raises(world, LayoutError, lambda: Mesh(world, dp=n, tp=0), "zero", "tp", "positive")


CASES.append(Case(check_mesh_layouts, None, 1))
