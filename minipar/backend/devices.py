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

    def __init__(self, xp: ModuleType = numpy) -> None:
        self.xp = xp

    def describe(self) -> str:
        return "numpy (host memory)"

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
        self.index, self.count = index, count

    def describe(self) -> str:
        try:
            gpu = self.xp.cuda.runtime.getDeviceProperties(self.index)["name"]
            gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
        except Exception:  # a description must never stop a run
            gpu = "GPU"
        return f"cupy on GPU {self.index} of {self.count} ({gpu})"

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
