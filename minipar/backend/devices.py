"""Where a backend's arrays live and how they cross to the host: the host itself (NumPy) and
CuPy's GPU. The strict stand-in device lives in ``strict.py``; ``minipar.backend`` chooses one.
"""

from __future__ import annotations

from types import ModuleType

import numpy


class BackendError(RuntimeError):
    """The requested backend cannot be used on this machine (one clear line for the user)."""


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

    def copy_to_host(self, a, out: numpy.ndarray) -> None:
        """Device -> host into an existing buffer (d2h)."""
        numpy.copyto(out, a)

    def copy_from_host(self, dst, src: numpy.ndarray) -> None:
        """Host -> device into an existing array (h2d)."""
        numpy.copyto(dst, src)

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

        # Pinned memory lets the copy engine move the bytes by DMA; CuPy pools these buffers.
        return cupyx.empty_pinned(shape, dtype=dtype)

    def copy_to_host(self, a, out: numpy.ndarray) -> None:
        a.get(out=out)  # blocking: returns once the bytes are in `out`

    def copy_from_host(self, dst, src: numpy.ndarray) -> None:
        dst.set(src)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()
