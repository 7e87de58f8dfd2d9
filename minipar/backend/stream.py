"""The stand-in device's timing: streams that copy host -> device *later*, and pinned memory
recycled as CuPy recycles it.

Why: on a GPU, ``dst.set(pinned)`` (``cudaMemcpyAsync`` from page-locked memory) only queues the
copy; the copy engine reads the host bytes at some moment before the host next learns that the
stream got that far (a stream or event synchronise, an event reported done, a blocking
device -> host copy). CuPy's pinned-memory pool hands a just-freed block straight back for the
next allocation of its size. So code that drops a pinned buffer right after queueing a copy
from it, and then lets anything write into the recycled block, gives the device the *later*
bytes - silently, and only when the GPU happens to be behind. A synchronous stand-in never
shows this. This one does, deterministically:

- Each thread has its own stream (``current()``), as a CuPy thread has its own current stream.
  A host -> device copy from pinned memory is queued; it runs when the stream next needs it:
  before the next kernel (stream order) or at a synchronisation point. A copy from pageable
  memory runs at once, after the queue, as CUDA documents for pageable ``cudaMemcpyAsync``.
- ``PinnedPool`` rounds sizes as CuPy's ``PinnedMemoryPool`` does (512-byte units, then a power
  of two) and hands out the most recently freed block of that size first; a block is free once
  the last array using it is gone.
- A queued copy snapshots its source when it is queued. If, by the time the host *knows* the
  copy finished, the source no longer holds those bytes, the host rewrote memory a GPU might
  still have been reading: a race, reported with the copy's call site (``StreamRace``), even
  when the stand-in happened to run the copy early enough to get the right bytes.

Kernels themselves run at launch (their results cannot be observed without a synchronising
copy, which the strict wall enforces), so only the host side of a copy can race here.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from time import perf_counter
import numpy

UNIT = 512  # bytes: CuPy's pinned pool allocation unit


class StreamRace(RuntimeError):
    """The host rewrote a buffer that a queued device copy may still read (see module doc)."""


def pooled_size(nbytes: int) -> int:
    """The block size CuPy's pinned pool serves ``nbytes`` from: whole units, a power of two."""
    units = -(-nbytes // UNIT) * UNIT
    return 1 << (units - 1).bit_length()


class _Lease:
    """One allocation from the pool. Arrays made from it keep it alive; when the last one goes,
    its block goes back to the pool (as CuPy's pooled pinned memory does when collected)."""

    __slots__ = ("block", "size", "pool", "__array_interface__", "__weakref__")

    def __init__(self, pool: "PinnedPool", block: numpy.ndarray, shape: tuple, dtype) -> None:
        self.block, self.size, self.pool = block, block.nbytes, pool
        self.__array_interface__ = {"shape": shape, "typestr": numpy.dtype(dtype).str,
                                    "version": 3, "data": (_address(block), False)}

    def __del__(self) -> None:
        self.pool._give_back(self.size, self.block)


class PinnedPool:
    """Page-locked host memory as CuPy pools it: freed blocks are reused, newest first."""

    def __init__(self) -> None:
        self._free: dict[int, list[numpy.ndarray]] = {}
        self._lock = threading.Lock()
        self.blocks = 0  # blocks ever created (a pool that reuses keeps this small)

    def empty(self, shape: tuple, dtype) -> numpy.ndarray:
        dtype = numpy.dtype(dtype)
        nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
        if nbytes == 0:
            return numpy.empty(shape, dtype)
        size = pooled_size(nbytes)
        with self._lock:
            free = self._free.get(size)
            if free:
                block = free.pop()
            else:
                block = numpy.empty(size, numpy.uint8)
                self.blocks += 1
        return numpy.asarray(_Lease(self, block, tuple(shape), dtype))

    def _give_back(self, size: int, block: numpy.ndarray) -> None:
        with self._lock:
            self._free.setdefault(size, []).append(block)

    @staticmethod
    def memory(a: numpy.ndarray) -> numpy.ndarray | None:
        """The pool memory under ``a``, as an array that does *not* keep its lease alive (a copy
        engine holds an address, not a reference); None when ``a`` is ordinary pageable memory."""
        base = a.base
        while isinstance(base, numpy.ndarray):
            base = base.base
        if type(base) is not _Lease:
            return None
        offset = _address(a) - _address(base.block)
        return numpy.ndarray(a.shape, a.dtype, buffer=base.block, offset=offset,
                             strides=a.strides)


def _address(a: numpy.ndarray) -> int:
    return a.__array_interface__["data"][0]


POOL = PinnedPool()


class Copy:
    """One queued host -> device copy; ``seconds`` is how long it took once it ran."""

    __slots__ = ("dst", "src", "expected", "seq", "site", "seconds")

    def __init__(self, dst, src, expected, seq: int, site: str) -> None:
        self.dst, self.src, self.expected, self.seq, self.site = dst, src, expected, seq, site
        self.seconds: float | None = None

    def describe(self) -> str:
        return (f"host -> device copy #{self.seq} ({self.src.shape} {self.src.dtype}) "
                f"from {self.site}")


class Stream:
    """One thread's queue of device work (see the module docstring)."""

    def __init__(self) -> None:
        self.queue: deque[Copy] = deque()
        self.unconfirmed: list[Copy] = []  # ran, but the host does not know it yet
        self.seq = 0  # copies queued so far
        self.ran = 0  # copies run so far (in order)
        self.kernels = 0  # kernels launched since the host last synchronised
        self.last_seconds = 0.0  # how long the last device -> host copy took

    def copy_from_host(self, dst: numpy.ndarray, src: numpy.ndarray) -> Copy:
        """Queue ``dst[...] = src`` (pinned ``src``) or do it now (pageable ``src``)."""
        pinned = POOL.memory(src)
        self.seq += 1
        copy = Copy(dst, src if pinned is None else pinned, None, self.seq, _site())
        if pinned is None:  # CUDA stages pageable memory before returning: safe to reuse
            self.run_queued()
            self._run(copy)
            return copy
        copy.expected = src.copy()
        self.queue.append(copy)
        return copy

    def launch(self) -> None:
        """A kernel is launched: in stream order it follows every queued copy."""
        if self.queue:
            self.run_queued()
        self.kernels += 1

    def run_queued(self) -> None:
        late = []
        while self.queue:
            copy = self.queue.popleft()
            if not numpy.array_equal(copy.src, copy.expected, equal_nan=True):
                late.append(f"{copy.describe()}: the host rewrote its pinned source before "
                            f"the copy ran, so the device got the later bytes")
                copy.expected = None  # reported once
            self._run(copy)
            self.unconfirmed.append(copy)
        _report(late)

    def _run(self, copy: Copy) -> None:
        t0 = perf_counter()
        numpy.copyto(copy.dst, copy.src)
        copy.seconds = perf_counter() - t0
        self.ran = copy.seq

    def confirm(self, upto: int) -> None:
        """The host learns that copies up to ``upto`` have finished: their sources must still
        hold what was queued, or the host rewrote them while a GPU could still be reading."""
        keep, rewritten = [], []
        for copy in self.unconfirmed:
            if copy.seq > upto:
                keep.append(copy)
            elif copy.expected is not None and not numpy.array_equal(copy.src, copy.expected,
                                                                    equal_nan=True):
                rewritten.append(f"{copy.describe()}: the host rewrote its pinned source before "
                                 "it knew the copy had finished (a GPU may still have been "
                                 "reading it)")
        self.unconfirmed = keep
        _report(rewritten)

    def synchronize(self) -> None:
        self.run_queued()
        self.confirm(self.seq)
        self.kernels = 0

    def record(self) -> "Event":
        return Event(self, self.seq)


class Event:
    """A point in a stream (``cupy.cuda.Event`` recorded on it)."""

    def __init__(self, stream: Stream, seq: int) -> None:
        self.stream, self.seq = stream, seq

    @property
    def done(self) -> bool:
        """True once the stream ran past this point (the host then knows it did)."""
        if self.stream.ran < self.seq:
            return False  # a queued copy runs only when the stream needs it
        self.stream.confirm(self.seq)
        return True

    def synchronize(self) -> None:
        self.stream.run_queued()
        self.stream.confirm(self.seq)


class Races:
    """Every race the stand-in saw in this process. Each is raised where it is seen, unless
    ``record_only`` (an MPI test sets it, so that one rank does not leave the others waiting,
    and checks ``seen`` on every rank afterwards)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.record_only = False
        self._lock = threading.Lock()

    def report(self, message: str) -> None:
        with self._lock:
            self.seen.append(message)
        if not self.record_only:
            raise StreamRace(message)


RACES = Races()


def _report(messages: list[str]) -> None:
    """Report races after the stream's state is settled, so a raise leaves it consistent."""
    for message in messages:
        RACES.report(message)


_PLUMBING = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d)
                  for d in ("backend", "dist"))


def _site() -> str:
    """``file:line`` of the innermost caller outside minipar's backend/ and dist/: the code whose
    transfer queued a copy (a pipeline receive, a collective's caller)."""
    frame = sys._getframe(2)
    while frame is not None and os.path.dirname(
            os.path.abspath(frame.f_code.co_filename)) in _PLUMBING:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno}"
