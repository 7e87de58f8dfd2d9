"""The MPI world: ``Comm`` over mpi4py, one process per rank.

Arrays move with mpi4py's buffer (upper-case) methods on contiguous NumPy arrays, so the hot
path never pickles: ``Allreduce``, ``Allgather``, ``Reduce_scatter_block``, ``Bcast``, ``Send``,
``Recv``, ``Isend``, ``Irecv``, ``Iallreduce``. Only ``allgather_obj``/``bcast_obj`` pickle.

With ``check=True`` (or env ``MINIPAR_COMM_CHECK=1``) every collective first compares the
ranks' calls (op, shape, dtype, axis, root) with one small extra allgather, so a mismatch is the
same ``CommError`` on every rank instead of a hang or garbage. That extra message is not
counted in the stats; the thread world always makes this check, at no cost.

Device arrays (the cupy backend) go to MPI as device buffers when MPI is CUDA-aware and are
staged through host buffers otherwise (``minipar.dist.staging``; ``comm_mode()`` says which and
why). Detection, first match wins: ``MINIPAR_HOST_STAGING=1`` or ``MPIComm(staging=True)``
forces staging, ``staging=False`` forces device buffers; ``MINIPAR_CUDA_AWARE=1``/``0`` says
whether MPI is CUDA-aware; else MPI is asked (``MPIX_Query_cuda_support``, which MPICH and Open
MPI export; mpi4py 4.1 does not wrap it); else staging, the safe choice. The PyPI ``mpich``
wheel is not CUDA-aware, so staging is its default.

A CUDA-aware MPI need not be CUDA-aware everywhere: Open MPI documents device buffers for its
point-to-point and *blocking* collective calls only, not for non-blocking collectives
(``MPI_Iallreduce``, which ``--bucket-mb > 0`` uses). So even in direct mode a non-blocking
collective is staged through host memory unless ``MINIPAR_CUDA_AWARE_NBC=1`` says this MPI's
non-blocking collectives read device memory too (``nonblocking_on_device``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time
import traceback
from typing import Any

from mpi4py import MPI
from mpi4py.util import dtlib

from minipar import backend
from minipar.dist.base import Comm, CommError, call_site, mismatch_error
from minipar.dist.staging import Staging
from minipar.dist.stats import CommStats

_OPS = {"sum": MPI.SUM, "max": MPI.MAX}
ABORT_GRACE_S = 0.2  # between a failing rank's error line and its MPI Abort (install_abort_handler)


# -- 16-bit floats (mixed precision) -------------------------------------------------------------
# MPI has no bfloat16 (and float16 only as an extension), so a 16-bit float buffer travels as
# MPI.UINT16_T, and a reduction over it is a user-defined op that adds (or takes the max) in
# fp32 and rounds once: the arithmetic of ThreadComm's NumPy add and of NCCL's 16-bit reductions.

def _is_16bit_float(dtype) -> bool:
    return dtype.itemsize == 2 and dtype.kind in "fV"  # float16, or ml_dtypes' bfloat16


def _buffer(x):
    """What MPI is given for array ``x``: the array, or a 16-bit float as raw uint16."""
    if _is_16bit_float(x.dtype):
        return [x.view("uint16"), MPI.UINT16_T]
    return x


@functools.lru_cache(maxsize=None)
def _op16(dtype_name: str, op: str) -> MPI.Op:
    import numpy  # the op runs on host buffers (staged when the arrays live on a GPU)

    dtype = numpy.dtype(dtype_name)
    ufunc = numpy.maximum if op == "max" else numpy.add

    def combine(inbuf, inoutbuf, datatype) -> None:
        a, b = numpy.frombuffer(inbuf, dtype=dtype), numpy.frombuffer(inoutbuf, dtype=dtype)
        b[...] = ufunc(a.astype(numpy.float32), b.astype(numpy.float32)).astype(dtype)
    return MPI.Op.Create(combine, commute=True)


def _op(op: str, dtype):
    return _op16(dtype.name, op) if _is_16bit_float(dtype) else _OPS[op]


@functools.lru_cache(maxsize=1)
def query_cuda_support() -> bool | None:
    """Whether the loaded MPI library can read CUDA device memory (None: it cannot tell).

    Calls ``MPIX_Query_cuda_support()`` in the ``libmpi`` this process has loaded (found in
    ``/proc/self/maps``; Linux only). It reports run-time support, so an MPI built with CUDA
    but started without it (e.g. MPICH with ``MPIR_CVAR_ENABLE_GPU=0``) answers False.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            libs = {line.split()[-1] for line in fh
                    if os.path.basename(line.split()[-1]).startswith("libmpi.so")}
    except OSError:
        return None
    for path in sorted(libs):
        try:
            fn = ctypes.CDLL(path).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_int, []
        return bool(fn())
    return None


def device_transport(staging: bool | None = None) -> tuple[bool, str]:
    """(pass device buffers directly?, why) for device arrays; see the module docstring."""
    if staging is True or os.environ.get("MINIPAR_HOST_STAGING") == "1":
        why = "staging=True" if staging is True else "MINIPAR_HOST_STAGING=1"
        return False, f"host staging (forced by {why})"
    if staging is False:
        return True, "device buffers straight to MPI (forced by staging=False)"
    aware = os.environ.get("MINIPAR_CUDA_AWARE")
    if aware in ("0", "1"):
        return (aware == "1", "device buffers straight to MPI (MINIPAR_CUDA_AWARE=1)"
                if aware == "1" else "host staging (MINIPAR_CUDA_AWARE=0)")
    supported = query_cuda_support()
    if supported:
        return True, "device buffers straight to MPI (CUDA-aware MPI)"
    if supported is None:
        return False, ("host staging (cannot tell whether MPI is CUDA-aware; "
                       "set MINIPAR_CUDA_AWARE=1 if it is)")
    return False, "host staging (MPI is not CUDA-aware)"


def nonblocking_on_device() -> tuple[bool, str]:
    """(may non-blocking collectives get device buffers?, why), for a CUDA-aware MPI."""
    value = os.environ.get("MINIPAR_CUDA_AWARE_NBC")
    if value in ("0", "1"):
        return value == "1", f"MINIPAR_CUDA_AWARE_NBC={value}"
    if MPI.Get_library_version().startswith("Open MPI"):
        return False, "Open MPI's are not CUDA-aware"
    return False, ("minipar cannot tell whether this MPI's are CUDA-aware; set "
                   "MINIPAR_CUDA_AWARE_NBC=1 if they are")


def comm_mode(staging: bool | None = None) -> str:
    """One line for the start-up banner: how this backend's arrays reach MPI."""
    if not backend.on_device():
        return f"host arrays ({backend.name()} backend): MPI reads and writes them in place"
    direct, why = device_transport(staging)
    if not direct:
        return why
    nbc, nbc_why = nonblocking_on_device()
    return (f"{why}; non-blocking collectives "
            f"{'too' if nbc else 'staged through host memory'} ({nbc_why})")


class MPIComm(Comm):
    """A ``Comm`` over an mpi4py communicator (see ``minipar.dist.comm`` for the semantics).

    ``staging``: None detects how device arrays reach MPI, True forces host staging, False
    forces device buffers (``device_transport``). Sub-groups from ``split`` inherit the choice.
    """

    def __init__(self, mpi_comm: MPI.Comm, name: str = "world", check: bool | None = None,
                 staging: bool | None = None):
        self.mpi = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.name = name
        self.stats = CommStats()
        self.check = os.environ.get("MINIPAR_COMM_CHECK") == "1" if check is None else check
        self.staging = staging
        direct = device_transport(staging)[0]
        self.wire = Staging(self.stats, direct=direct,
                            direct_nonblocking=direct and nonblocking_on_device()[0])

    @classmethod
    def world(cls, check: bool | None = None, staging: bool | None = None) -> "MPIComm":
        """All processes of the job, on a duplicate of COMM_WORLD (collective).

        The duplicate keeps minipar's messages apart from any raw mpi4py traffic on COMM_WORLD.
        """
        return cls(MPI.COMM_WORLD.Dup(), "world", check, staging)

    def _verify(self, desc: tuple) -> None:
        if self.check:
            calls = self.mpi.allgather((desc, call_site()))
            descs = [d for d, _ in calls]
            if any(d != descs[0] for d in descs):
                raise mismatch_error(self, descs, [site for _, site in calls])

    # ---- collectives (self.wire turns device arrays into buffers MPI can address) ----

    def _allreduce(self, x, op, desc):
        self._verify(desc)
        send = self.wire.outgoing(x)
        out, finish = self.wire.incoming(x.shape, x.dtype)
        self.mpi.Allreduce(_buffer(send), _buffer(out), op=_op(op, x.dtype))
        return finish()

    def _allreduce_inplace(self, x, op, desc):
        self._verify(desc)
        buf, write_back = self.wire.inplace(x)
        self.mpi.Allreduce(MPI.IN_PLACE, _buffer(buf), op=_op(op, x.dtype))
        write_back()

    def _iallreduce_inplace(self, x, op, desc):
        self._verify(desc)
        buf, write_back = self.wire.inplace(x, nonblocking=True)
        req = self.mpi.Iallreduce(MPI.IN_PLACE, _buffer(buf), op=_op(op, x.dtype))

        def finish() -> None:
            req.Wait()
            write_back()
        return finish

    def _allgather(self, x, desc):
        self._verify(desc)
        send = self.wire.outgoing(x)
        out, finish = self.wire.incoming((self.size,) + x.shape, x.dtype)
        self.mpi.Allgather(_buffer(send), _buffer(out))
        return finish()

    def _reduce_scatter(self, x, op, desc):
        self._verify(desc)
        send = self.wire.outgoing(x)
        out, finish = self.wire.incoming((x.shape[0] // self.size,) + x.shape[1:], x.dtype)
        self.mpi.Reduce_scatter_block(_buffer(send), _buffer(out), op=_op(op, x.dtype))
        return finish()

    def _broadcast(self, x, root, desc):
        self._verify(desc)
        if self.rank == root:
            self.mpi.Bcast(_buffer(self.wire.outgoing(x)), root=root)
            return None
        out, finish = self.wire.incoming(x.shape, x.dtype)
        self.mpi.Bcast(_buffer(out), root=root)
        return finish()

    def _barrier(self, desc):
        self._verify(desc)
        self.mpi.Barrier()

    def _allgather_bytes(self, payload, desc):
        self._verify(desc)
        return self.mpi.allgather(payload)

    def _bcast_bytes(self, payload, root, desc):
        self._verify(desc)
        return self.mpi.bcast(payload, root=root)

    def _split(self, color, key, name):
        return MPIComm(self.mpi.Split(color, key), name, self.check, self.staging)

    # ---- point to point ----

    def _send(self, x, dest, tag):
        self.mpi.Send(_buffer(self.wire.outgoing(x)), dest=dest, tag=tag)

    def _isend(self, x, dest, tag):
        buf = self.wire.outgoing(x)
        req = self.mpi.Isend(_buffer(buf), dest=dest, tag=tag)

        def finish() -> None:
            req.Wait()
            del keep[:]  # the buffers must live until the send completes
        keep = [x, buf]
        return finish

    def _recv(self, shape, dtype, source, tag):
        out, finish = self.wire.incoming(shape, dtype)
        status = MPI.Status()
        try:
            self.mpi.Recv(_buffer(out), source=source, tag=tag, status=status)
        except MPI.Exception as exc:
            raise self._recv_error(shape, dtype, source, tag, str(exc)) from exc
        self._check_count(status, out, source, tag)
        return finish()

    def _recv_any(self, shape, dtype, tag):
        out, finish = self.wire.incoming(shape, dtype)
        status = MPI.Status()
        try:
            self.mpi.Recv(_buffer(out), source=MPI.ANY_SOURCE, tag=tag, status=status)
        except MPI.Exception as exc:
            raise self._recv_error(shape, dtype, "any", tag, str(exc)) from exc
        source = status.Get_source()
        self._check_count(status, out, source, tag)
        return finish(), source

    def _irecv(self, shape, dtype, source, tag):
        out, finish_copy = self.wire.incoming(shape, dtype)
        req = self.mpi.Irecv(_buffer(out), source=source, tag=tag)

        def finish() -> Any:
            status = MPI.Status()
            try:
                req.Wait(status)
            except MPI.Exception as exc:
                raise self._recv_error(shape, dtype, source, tag, str(exc)) from exc
            self._check_count(status, out, source, tag)
            return finish_copy()
        return finish

    def _check_count(self, status: MPI.Status, out, source: int, tag: int) -> None:
        dtype = "uint16" if _is_16bit_float(out.dtype) else out.dtype
        got = status.Get_count(dtlib.from_numpy_dtype(dtype))
        if got != out.size:
            raise self._recv_error(out.shape, out.dtype, source, tag,
                                   f"the message has {got} elements")

    def _recv_error(self, shape, dtype, source, tag, why: str) -> CommError:
        return CommError(f"{self!r}: recv(source={source}, tag={tag}) expected {shape} {dtype}: "
                         f"{why}")


def install_abort_handler(comm: Comm | None = None) -> None:
    """Make an uncaught exception on any rank end the whole job at once.

    A plain exception on one rank of ``mpirun -n 4`` leaves the other ranks blocked in their
    next collective forever. This ``sys.excepthook`` prints one line,
    ``minipar: error on rank R: <message>`` (the full traceback when ``MINIPAR_DEBUG=1``), waits
    ``ABORT_GRACE_S`` for mpirun to forward it, then calls ``MPI.COMM_WORLD.Abort(1)``, which
    takes every rank down.
    """
    rank = comm.rank if comm is not None else MPI.COMM_WORLD.Get_rank()

    def hook(etype, value, tb) -> None:
        if os.environ.get("MINIPAR_DEBUG") == "1":
            traceback.print_exception(etype, value, tb, file=sys.stderr)
        # minipar's own user-facing errors are written to be read alone; others need the type.
        own = etype.__module__.startswith("minipar") and str(value)
        msg = str(value) if own else f"{etype.__name__}: {value}"
        sys.stdout.flush()
        # One write of the whole line: ranks erring at once never share a line (print() may
        # write the text and the newline separately, and another rank's text land between).
        os.write(sys.stderr.fileno(), f"minipar: error on rank {rank}: {msg}\n".encode())
        # The line is in the pipe to mpirun's proxy, not yet at mpirun. An Abort at once has
        # lost it (seen in CI, about one run in ten: exit code 1, stderr empty, MPICH's own
        # abort message gone too): Hydra can tear the job down before it has forwarded what
        # its proxy still holds. A moment's wait lets the line through; a dying job can spare
        # it.
        time.sleep(ABORT_GRACE_S)
        MPI.COMM_WORLD.Abort(1)

    sys.excepthook = hook
