"""The array module every kernel uses: NumPy by default, CuPy on GPU nodes.

Kernels never ``import numpy`` for array math; they call ``xp()`` so that one code path runs on
the CPU and on the GPU. The choice is process-wide (each MPI rank is its own process; the
in-process thread world shares one backend, which is what we want there too).
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy

_xp: ModuleType = numpy
_name = "numpy"


class BackendError(RuntimeError):
    """The requested backend cannot be used on this machine (one clear line for the user)."""


def xp() -> ModuleType:
    """The array module in use (``numpy`` or ``cupy``)."""
    return _xp


def name() -> str:
    return _name


def use(backend: str) -> ModuleType:
    """Select the backend by name; raises ``BackendError`` with a one-line reason if unusable."""
    global _xp, _name
    if backend == "numpy":
        _xp, _name = numpy, "numpy"
        return _xp
    if backend == "cupy":
        try:
            import cupy  # noqa: PLC0415 - optional dependency
        except ImportError as exc:
            raise BackendError(
                "--backend cupy: CuPy is not installed (pip install -e '.[gpu]')"
            ) from exc
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDARuntimeError when no driver or device
            raise BackendError("--backend cupy: no CUDA device is available here") from exc
        if n == 0:
            raise BackendError("--backend cupy: no CUDA device is available here")
        _xp, _name = cupy, "cupy"
        return _xp
    raise BackendError(f"--backend: unknown backend {backend!r} (choose numpy or cupy)")


def use_from_env() -> ModuleType:
    """Select the backend named by ``MINIPAR_BACKEND`` (default numpy); used by lessons and tests."""
    return use(os.environ.get("MINIPAR_BACKEND", "numpy"))


def to_host(a) -> numpy.ndarray:
    """A NumPy copy (or view) of an array from the current backend."""
    if _name == "cupy":
        return _xp.asnumpy(a)
    return numpy.asarray(a)


def from_host(a: numpy.ndarray):
    """Move a host array onto the current backend's device (no copy for NumPy)."""
    if _name == "cupy":
        return _xp.asarray(a)
    return a
