"""The strict backend: a stand-in GPU node for CPU machines, built on the strict array wall
(``minipar.backend.strict``) and the stand-in streams (``minipar.backend.stream``).

It behaves as ``CuPyDevice`` does where a GPU differs from the host: arrays refuse implicit
host conversion; there are ``MINIPAR_STRICT_DEVICES`` devices (default 2, a small GPU node, so
that the in-process world's ranks really sit on different devices and every array that
crosses between them must be moved); host staging buffers come from a pinned pool that
recycles blocks as CuPy's does; host -> device copies from them are queued and run later;
``synchronize`` waits for this thread's stream. What it checks that a GPU would only get wrong
silently: a kernel that mixes devices, a host write into the source of a copy that may not
have run (``StreamRace``), and MPI handed device memory while queued work may still write it.
"""

from __future__ import annotations

import os

import numpy

from typing import Callable

from minipar.backend.devices import BackendError, Device, InFlight
from minipar.backend.strict import THREAD, Namespace, StrictArray, select
from minipar.backend.stream import POOL, RACES, Races

DEVICES_VAR = "MINIPAR_STRICT_DEVICES"


def device_count() -> int:
    """How many stand-in devices this node has (``MINIPAR_STRICT_DEVICES``, default 2)."""
    value = os.environ.get(DEVICES_VAR, "2")
    if not value.isdigit() or int(value) < 1:
        raise BackendError(f"{DEVICES_VAR}={value}: must be a whole number >= 1")
    return int(value)


class StrictDevice(Device):
    """The strict backend's host/device operations; counts ``synchronize`` calls for tests."""

    name = "strict"
    on_device = True

    def __init__(self, count: int | None = None) -> None:
        super().__init__(Namespace())
        self.count = device_count() if count is None else count
        self.syncs = 0
        self.in_flight = InFlight()

    @property
    def races(self) -> Races:
        """Every staging race the stand-in saw in this process (``races.seen``)."""
        return RACES

    def describe(self) -> str:
        return (f"strict device {self.current()} of {self.count} (NumPy behind a device wall: "
                "a CPU stand-in for CuPy)")

    def current(self) -> int:
        return THREAD.device

    def select(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise BackendError(f"strict device {index} does not exist ({self.count} devices)")
        select(index)

    def to_host(self, a) -> numpy.ndarray:
        return a.get() if type(a) is StrictArray else numpy.asarray(a)

    def from_host(self, a) -> StrictArray:
        if type(a) is StrictArray:
            # Already on a device: cupy.asarray leaves it, or moves it here from another one.
            return a if a._dev == THREAD.device else StrictArray(a._a.copy())
        return StrictArray(numpy.array(a, copy=True))

    def host_empty(self, shape, dtype) -> numpy.ndarray:
        self.in_flight.release_done()  # blocks whose copies are done may be reused now
        return POOL.empty(shape, dtype)

    def copy_to_host(self, a: StrictArray, out: numpy.ndarray) -> float:
        a.get(out=out)  # blocking, as CuPy's get is by default: the stream has run
        self.in_flight.release_done()
        return THREAD.stream.last_seconds

    def copy_from_host(self, dst: StrictArray, src: numpy.ndarray,
                       on_done: Callable[[float], None] | None = None) -> None:
        copy = dst.set(src)  # queued when src is pinned, as cupy.ndarray.set queues it
        # As CuPyDevice: hold src until an event after the copy is done (see devices.py).
        seconds = (lambda: on_done(copy.seconds)) if on_done else None
        self.in_flight.hold(THREAD.stream.record(), src, seconds)

    def device_buffer(self, a: StrictArray) -> numpy.ndarray:
        # A CUDA-aware MPI reads and writes device memory in place: here, the storage itself.
        # It does so outside any stream, so nothing queued may still be writing that memory.
        stream = THREAD.stream
        if stream.queue or stream.kernels:
            RACES.report(f"MPI is handed device memory while {len(stream.queue)} copies and "
                         f"{stream.kernels} kernels queued since the last synchronize may still "
                         "write it")
        return a._a

    def synchronize(self) -> None:
        self.syncs += 1
        THREAD.stream.synchronize()
        self.in_flight.release_done()
