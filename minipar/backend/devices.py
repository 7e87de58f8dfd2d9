"""Where a backend's arrays live and how they cross to the host: the host itself (NumPy) and
CuPy's GPU. The strict stand-in device lives in ``standin.py``; ``minipar.backend`` chooses one.

A host -> device copy from pinned memory is asynchronous on a GPU: ``cupy.ndarray.set`` queues
``cudaMemcpyAsync``, which reads the host bytes when the stream gets to it, and CuPy's pinned
pool hands a freed block straight to the next allocation of its size. So a device keeps the
source of each such copy alive (``InFlight``) until an event recorded after the copy reports
done, as CuPy does for the staging buffers of its own uploads. Why not synchronise after each
copy instead: that would stall the host until the GPU has drained all work queued before the
copy, on every received message, and the host could no longer queue the next kernels while the
GPU works.
"""

from __future__ import annotations

import threading
from time import perf_counter
from types import ModuleType
from typing import Callable

import numpy


class BackendError(RuntimeError):
    """The requested backend cannot be used on this machine (one clear line for the user)."""


class InFlight:
    """Host buffers that queued copies may still read, each held until the event recorded after
    its copy is done; then its ``on_done`` runs. Per thread, as streams are."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _held(self) -> list:
        if not hasattr(self._local, "held"):
            self._local.held = []
        return self._local.held

    def hold(self, event, buffer, on_done: Callable[[], None] | None = None) -> None:
        self.release_done()
        self._held().append((event, buffer, on_done))

    def release_done(self) -> None:
        """Let go of every buffer whose copy is known to have finished."""
        held = self._held()
        if not held:
            return
        done, pending = [], []
        for h in held:
            (done if h[0].done else pending).append(h)
        held[:] = pending
        for _event, _buffer, on_done in done:
            if on_done is not None:
                on_done()

    def __len__(self) -> int:
        return len(self._held())


class Device:
    """Where a backend's arrays live and how they cross to the host. This one is the host."""

    name = "numpy"
    on_device = False  # arrays live apart from host memory (copies cost time and are counted)
    count = 1  # devices this process may use (GPUs on the node)

    def __init__(self, xp: ModuleType = numpy) -> None:
        self.xp = xp

    def describe(self) -> str:
        return "numpy (host memory)"

    def current(self) -> int:
        """The device the calling thread runs on (each thread has its own, as in CUDA)."""
        return 0

    def select(self, index: int) -> None:
        """Make device ``index`` the calling thread's device (new arrays and kernels go there)."""

    def to_host(self, a) -> numpy.ndarray:
        return numpy.asarray(a)

    def from_host(self, a):
        return a

    def host_empty(self, shape, dtype) -> numpy.ndarray:
        """A host buffer for staging (pinned, page-locked memory where the backend has it)."""
        return numpy.empty(shape, dtype=dtype)

    def copy_to_host(self, a, out: numpy.ndarray) -> float:
        """Device -> host into an existing buffer (d2h); returns once ``out`` holds the bytes.
        Returns the copy's own seconds (not the wait for the work that produces ``a``)."""
        t0 = perf_counter()
        numpy.copyto(out, a)
        return perf_counter() - t0

    def copy_from_host(self, dst, src: numpy.ndarray,
                       on_done: Callable[[float], None] | None = None) -> None:
        """Host -> device into an existing array (h2d). On a device it may return before the
        bytes have moved; the device then holds ``src`` until they have, so the caller may drop
        it at once (but must not write to it). ``on_done(seconds)`` receives the copy's own
        duration once it is known to have run (at the latest at the next ``synchronize``)."""
        t0 = perf_counter()
        numpy.copyto(dst, src)
        if on_done is not None:
            on_done(perf_counter() - t0)

    def device_buffer(self, a):
        """What a CUDA-aware MPI is handed for a device array (the array itself for CuPy)."""
        return a

    def synchronize(self) -> None:
        """Wait until the device has finished all queued work (MPI must see finished data)."""


class CuPyDevice(Device):
    """CuPy arrays on one GPU. Kernels run asynchronously on the current stream."""

    name = "cupy"
    on_device = True

    def __init__(self, cupy: ModuleType, index: int, count: int) -> None:
        super().__init__(cupy)
        self.index, self.count = index, count  # index: the GPU chosen for this process
        self.in_flight = InFlight()

    def describe(self) -> str:
        index = self.current()
        try:
            gpu = self.xp.cuda.runtime.getDeviceProperties(index)["name"]
            gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
        except Exception:  # a description must never stop a run
            gpu = "GPU"
        return f"cupy on GPU {index} of {self.count} ({gpu})"

    def current(self) -> int:
        try:
            return int(self.xp.cuda.runtime.getDevice())
        except Exception:  # a fake or broken runtime: the GPU chosen at start-up
            return self.index

    def select(self, index: int) -> None:
        self.xp.cuda.Device(index).use()  # CuPy's current device is per thread

    def to_host(self, a) -> numpy.ndarray:
        return self.xp.asnumpy(a)

    def from_host(self, a):
        return self.xp.asarray(a)

    def host_empty(self, shape, dtype) -> numpy.ndarray:
        import cupyx  # noqa: PLC0415 - ships with cupy

        self.in_flight.release_done()  # blocks whose copies are done may be reused now
        # Pinned memory lets the copy engine move the bytes by DMA; CuPy pools these buffers.
        return cupyx.empty_pinned(shape, dtype=dtype)

    def copy_to_host(self, a, out: numpy.ndarray) -> float:
        cuda = self.xp.cuda
        start, end = cuda.Event(), cuda.Event()
        start.record()
        a.get(out=out)  # blocking: returns once the bytes are in `out`
        end.record()
        end.synchronize()
        return cuda.get_elapsed_time(start, end) / 1e3  # ms between the events -> s

    def copy_from_host(self, dst, src: numpy.ndarray,
                       on_done: Callable[[float], None] | None = None) -> None:
        cuda = self.xp.cuda
        start, end = cuda.Event(), cuda.Event()
        start.record()
        dst.set(src)  # cudaMemcpyAsync: from pinned memory, src is read later
        end.record()
        seconds = (lambda: on_done(cuda.get_elapsed_time(start, end) / 1e3)) if on_done else None
        self.in_flight.hold(end, src, seconds)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()
        self.in_flight.release_done()
