"""Device arrays through real MPI: host staging and CUDA-aware mode, every copy counted.

The strict backend's arrays stand in for CuPy's: mpi4py cannot read them, so ``MPIComm`` must
either stage them through host buffers (recording "d2h"/"h2d") or, in CUDA-aware mode, hand MPI
the device memory after a stream sync. Both paths must give the numpy backend's results.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from minipar import backend
from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.mpi_comm import MPIComm, comm_mode, device_transport, query_cuda_support
from minipar.dist.stats import CommStats
from minipar.backend.strict import StrictArray
from minipar.dist.assertions import collective_assert


@pytest.fixture()
def strict():
    before = backend.name()
    yield backend.use("strict")
    backend.use(before)


def copies(comm) -> tuple[int, int]:
    done = comm.stats.copies_as_dict()
    return (done.get("d2h", {}).get("bytes", 0), done.get("h2d", {}).get("bytes", 0))


def test_mpi_cannot_read_device_arrays(world, strict):
    x = strict.ones(4)
    try:
        world.mpi.Allreduce(x, np.empty(4))  # refused while reading arguments: no message
        refused = False
    except (TypeError, BufferError, ValueError):
        refused = True
    collective_assert(world, refused, "mpi4py accepted a strict-device array as a buffer")


@pytest.mark.parametrize("staging, nbc", [(True, "0"), (False, "0"), (False, "1")],
                         ids=["host-staging", "cuda-aware", "cuda-aware-nbc"])
def test_each_collective_moves_device_arrays_and_counts_copies(world, strict, staging, nbc,
                                                               monkeypatch):
    """Copies as the staging table says; in CUDA-aware mode none, except for the non-blocking
    allreduce unless this MPI's non-blocking collectives read device memory (nbc)."""
    monkeypatch.setenv("MINIPAR_CUDA_AWARE_NBC", nbc)
    p, r = world.size, world.rank
    comm = MPIComm(world.mpi.Dup(), "dev", check=True, staging=staging)
    dev = backend.device()
    host = np.arange(2 * p * 3, dtype=np.float64).reshape(2 * p, 3) + 10 * r
    n = host.nbytes
    everyone = [np.arange(2 * p * 3, dtype=np.float64).reshape(2 * p, 3) + 10 * q
                for q in range(p)]
    total = sum(everyone)
    prev, nxt = (r - 1) % p, (r + 1) % p
    problems: list[str] = []

    def check(what, got, want, d2h, h2d):
        ok_type = got is None or type(got) is StrictArray
        ok_val = got is None or np.array_equal(backend.to_host(got), want)
        staged = staging or (what == "iallreduce_" and nbc == "0")
        expect = (d2h, h2d) if staged else (0, 0)
        ops = set(comm.stats.as_dict())  # communication only: the copies are kept apart
        if not (ok_type and ok_val and copies(comm) == expect and not ops & {"d2h", "h2d"}):
            problems.append(f"{what}: type ok {ok_type}, values ok {ok_val}, copies "
                            f"{copies(comm)} != {expect}, ops {sorted(ops)}")
        comm.stats.reset()

    syncs = dev.syncs
    check("allreduce", comm.allreduce(strict.asarray(host)), total, n, n)
    x = strict.asarray(host)
    comm.allreduce_(x)
    check("allreduce_", x, total, n, n)
    x = strict.asarray(host)
    comm.iallreduce_(x, op="avg").wait()
    check("iallreduce_", x, total / p, n, n)
    check("allgather", comm.allgather(strict.asarray(host)), np.concatenate(everyone), n,
          p * n)
    check("reduce_scatter", comm.reduce_scatter(strict.asarray(host)),
          total[2 * r:2 * r + 2], n, n // p)
    got = comm.broadcast(strict.asarray(host), root=1)
    check("broadcast", got, everyone[1], n if r == 1 else 0, 0 if r == 1 else n)
    req = comm.isend(strict.asarray(host), nxt, tag=5)
    got = comm.recv(host.shape, host.dtype, prev, tag=5)
    req.wait()
    check("isend/recv", got, everyone[prev], n, n)
    pending = comm.irecv(host.shape, host.dtype, prev, tag=6)
    comm.send(strict.asarray(host), nxt, tag=6)
    check("send/irecv", pending.wait(), everyone[prev], n, n)
    if not staging and dev.syncs == syncs:
        problems.append("CUDA-aware mode never synchronised the stream before MPI")
    comm.mpi.Free()
    collective_assert(world, not problems, "; ".join(problems))


def layouts(size: int) -> list[ParallelConfig]:
    """Layouts for a world of 2 or 4 ranks, each axis once."""
    return [ParallelConfig(dp=size, zero=1),
            ParallelConfig(tp=2, dp=size // 2, sequence_parallel=True),
            ParallelConfig(pp=2, dp=size // 2, schedule="1f1b", microbatches=2)]


@pytest.mark.parametrize("staging", [True, False], ids=["host-staging", "cuda-aware"])
def test_training_on_device_arrays_equals_numpy_and_serial(world, staging, monkeypatch):
    """Same losses, parameters, gradients and communication counts as the numpy backend; the
    staging copies are recorded (apart) only when staging."""
    cfg = ModelConfig(vocab_size=9, seq_len=4, n_layers=2, d_model=8, n_heads=2)
    problems: list[str] = []
    before = backend.name()
    copied: dict[str, int] = {}
    record_copy = CommStats.record_copy

    def counting(self, op, nbytes, seconds):
        copied[op] = copied.get(op, 0) + nbytes
        record_copy(self, op, nbytes, seconds)
    monkeypatch.setattr(CommStats, "record_copy", counting)
    for par in layouts(world.size):
        batches = random_batches(cfg, steps=2, batch=2 * par.dp, seed=par.tp + par.pp)
        runs, copies_by = {}, {}
        for name in ("numpy", "strict"):
            backend.use(name)
            copied.clear()
            comm = MPIComm(world.mpi.Dup(), "world", check=True, staging=staging)
            try:
                runs[name] = train_layout(comm, cfg, par, batches)
            finally:
                backend.use(before)
                comm.mpi.Free()
            copies_by[name] = dict(copied)
        backend.use("numpy")
        try:
            ref = serial_reference(cfg, batches)
        finally:
            backend.use(before)
        bad = mismatches(runs["strict"], runs["numpy"], 0.0) + mismatches(runs["strict"], ref,
                                                                          1e-9)
        if counts(runs["strict"]) != counts(runs["numpy"]):
            bad.append(f"communication {counts(runs['strict'])} != {counts(runs['numpy'])}")
        staged = set(copies_by["strict"]) == {"d2h", "h2d"}
        if bad or staged != staging or copies_by["numpy"]:
            problems.append(f"{par}: {bad[:2]}, copies {copies_by}")
    collective_assert(world, not problems, "; ".join(problems))


def counts(run) -> list:
    """Calls and bytes per step, group and op (seconds differ from run to run)."""
    return [{g: {op: (s["calls"], s["bytes"]) for op, s in ops.items()}
             for g, ops in step.items()} for step in run.comm]


def test_comm_mode_says_how_arrays_reach_mpi(world, monkeypatch):
    for var in ("MINIPAR_HOST_STAGING", "MINIPAR_CUDA_AWARE", "MINIPAR_CUDA_AWARE_NBC"):
        monkeypatch.delenv(var, raising=False)
    before = backend.name()
    backend.use("numpy")
    seen = {"numpy": comm_mode()}
    backend.use("strict")
    try:
        aware = query_cuda_support()
        seen["detected"] = comm_mode()
        seen["forced"] = comm_mode(staging=True)
        monkeypatch.setenv("MINIPAR_CUDA_AWARE", "1")
        seen["aware"] = comm_mode()
        seen["aware-comm"] = MPIComm(MPI.COMM_SELF, "self").wire.direct
        seen["aware-nbc-comm"] = MPIComm(MPI.COMM_SELF, "self").wire.direct_nonblocking
        monkeypatch.setenv("MINIPAR_CUDA_AWARE_NBC", "1")
        seen["aware-nbc"] = comm_mode()
        seen["nbc-comm"] = MPIComm(MPI.COMM_SELF, "self").wire.direct_nonblocking
        monkeypatch.setenv("MINIPAR_HOST_STAGING", "1")
        seen["env-forced"] = comm_mode()
        seen["env-comm"] = MPIComm(MPI.COMM_SELF, "self").wire.direct
        seen["env-nbc-comm"] = MPIComm(MPI.COMM_SELF, "self").wire.direct_nonblocking
        monkeypatch.setenv("MINIPAR_CUDA_AWARE", "0")
        monkeypatch.delenv("MINIPAR_HOST_STAGING")
        seen["not-aware"] = device_transport()
    finally:
        backend.use(before)
    unknown = ("minipar cannot tell whether this MPI's are CUDA-aware; set "
               "MINIPAR_CUDA_AWARE_NBC=1 if they are")  # the PyPI wheel is MPICH
    want = {
        "numpy": "host arrays (numpy backend): MPI reads and writes them in place",
        # The PyPI mpich wheel exports MPIX_Query_cuda_support and is not CUDA-aware.
        "detected": ("device buffers straight to MPI (CUDA-aware MPI); non-blocking "
                     f"collectives staged through host memory ({unknown})" if aware else
                     "host staging (MPI is not CUDA-aware)"),
        "forced": "host staging (forced by staging=True)",
        "aware": ("device buffers straight to MPI (MINIPAR_CUDA_AWARE=1); non-blocking "
                  f"collectives staged through host memory ({unknown})"),
        "aware-comm": True,
        "aware-nbc-comm": False,
        "aware-nbc": ("device buffers straight to MPI (MINIPAR_CUDA_AWARE=1); non-blocking "
                      "collectives too (MINIPAR_CUDA_AWARE_NBC=1)"),
        "nbc-comm": True,
        "env-forced": "host staging (forced by MINIPAR_HOST_STAGING=1)",
        "env-comm": False,
        "env-nbc-comm": False,
        "not-aware": (False, "host staging (MINIPAR_CUDA_AWARE=0)"),
    }
    diff = {k: (seen[k], want[k]) for k in want if seen[k] != want[k]}
    collective_assert(world, isinstance(aware, bool) and not diff,
                      f"query_cuda_support() = {aware!r}; {diff}")


@pytest.mark.parametrize("nbc", ["0", "1"])
def test_bucketed_data_parallel_in_cuda_aware_mode(world, monkeypatch, nbc):
    """--bucket-mb > 0 syncs gradients with non-blocking allreduces. In CUDA-aware mode they
    get device buffers only where MPI allows it (nbc=1); else each is staged, so the copies
    are exactly the gradients' bytes, each way, every step. Same result as the serial run."""
    monkeypatch.setenv("MINIPAR_CUDA_AWARE_NBC", nbc)
    cfg = ModelConfig(vocab_size=9, seq_len=4, n_layers=2, d_model=8, n_heads=2)
    par = ParallelConfig(dp=world.size, bucket_mb=1e-4)
    batches = random_batches(cfg, steps=2, batch=2 * world.size, seed=5)
    copied: dict[str, int] = {}
    record_copy = CommStats.record_copy

    def counting(self, op, nbytes, seconds):
        copied[op] = copied.get(op, 0) + nbytes
        record_copy(self, op, nbytes, seconds)
    monkeypatch.setattr(CommStats, "record_copy", counting)
    before = backend.name()
    backend.use("strict")
    comm = MPIComm(world.mpi.Dup(), "world", check=True, staging=False)
    try:
        run = train_layout(comm, cfg, par, batches)
    finally:
        comm.mpi.Free()
        backend.use("numpy")
    try:
        bad = mismatches(run, serial_reference(cfg, batches), 1e-9)
    finally:
        backend.use(before)
    grads = len(batches) * sum(g.nbytes for g in run.grads.values())
    want = {} if nbc == "1" else {"d2h": grads, "h2d": grads}
    collective_assert(world, not bad and copied == want,
                      f"copies {copied} != {want}; parallel != serial: {bad[:2]}")


@pytest.mark.parametrize("layout", ["1f1b", "gpipe", "dp-bucketed"])
def test_staged_transfers_do_not_race(world, layout):
    """Stage 0 receives gradients back to back (1F1B's drain, GPipe's backward), and bucketed
    data parallelism finishes non-blocking allreduces back to back, all through pinned buffers
    that the stand-in's pool recycles as CuPy's does, while its stream runs each host -> device
    copy as late as a GPU may: no copy may see a later message's bytes."""
    p = world.size
    cfg = ModelConfig(vocab_size=9, seq_len=4, n_layers=p, d_model=8, n_heads=2)
    par = (ParallelConfig(dp=p, bucket_mb=1e-4) if layout == "dp-bucketed" else
           ParallelConfig(pp=p, schedule=layout, microbatches=4))
    batches = random_batches(cfg, steps=2, batch=8, seed=3)
    before = backend.name()
    backend.use("strict")
    races = backend.device().races
    races.record_only, mark = True, len(races.seen)  # a raise on one rank would strand the rest
    comm = MPIComm(world.mpi.Dup(), "world", check=True, staging=True)
    try:
        run = train_layout(comm, cfg, par, batches)
    finally:
        found = races.seen[mark:]
        races.record_only = False
        comm.mpi.Free()
        backend.use("numpy")
    try:
        bad = mismatches(run, serial_reference(cfg, batches), 1e-9)
    finally:
        backend.use(before)
    collective_assert(world, not found and not bad,
                      f"rank {world.rank}: {len(found)} staging races, the first: {found[:1]}; "
                      f"parallel != serial: {bad[:2]}")
