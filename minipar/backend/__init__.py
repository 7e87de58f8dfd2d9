"""The array module every kernel uses: NumPy by default, CuPy on GPU nodes.

Kernels never ``import numpy`` for array math; they call ``xp()`` so that one code path runs on
the CPU and on the GPU. The choice is process-wide (each MPI rank is its own process; the
in-process thread world shares one backend, which is what we want there too).

Three backends:

- ``numpy``: arrays live in host memory; nothing ever moves.
- ``cupy``: arrays live on this rank's GPU, chosen by the rank's index on its node
  (``local_rank() % devices``), so ``mpirun -n 4`` on a 4-GPU node puts one rank on each GPU.
- ``strict``: NumPy behind a wall (``minipar.backend.strict``), a stand-in GPU node for CPU
  machines (``minipar.backend.standin``) whose arrays refuse every implicit conversion to NumPy,
  as CuPy's do, with devices per thread and copies that run later, as a GPU's do. Tests run
  the model on it to prove that no array silently falls back to the host.

Besides ``xp()``, a backend knows how to move data between host and device; the MPI world uses
that to stage device arrays through host buffers when MPI cannot read device memory
(``minipar.dist.staging``).

The bottom layer, beside ``minipar.config``: it imports nothing else from minipar.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy

from minipar.backend.devices import BackendError, CuPyDevice, Device
from minipar.backend.standin import StrictDevice

__all__ = ["BackendError", "CuPyDevice", "Device", "StrictDevice"]

BACKENDS = ("numpy", "cupy", "strict")
# Launchers announce a process's index among the ranks of its node here: MPICH's Hydra,
# Open MPI, Slurm.
LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


_active: Device = Device()


def xp() -> ModuleType:
    """The array module in use (``numpy``, ``cupy`` or the strict stand-in)."""
    return _active.xp


def host_xp() -> ModuleType:
    """The array module of host memory (NumPy): what MPI's staged buffers are made of."""
    return numpy


def name() -> str:
    return _active.name


def device() -> Device:
    """The active backend's host/device operations (see ``Device``)."""
    return _active


def on_device() -> bool:
    """True when arrays live apart from host memory (cupy, strict): copies must be made."""
    return _active.on_device


def describe() -> str:
    """One line for a start-up banner: the backend and, on a GPU, which one."""
    return _active.describe()


def local_rank() -> int:
    """This process's index among the ranks on its node, from the launcher (0 if none)."""
    for var in LOCAL_RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def pick_device(local: int, n_devices: int) -> int:
    """The GPU a rank uses: ranks of a node take its GPUs round robin (local rank mod count)."""
    if n_devices <= 0:
        raise ValueError(f"pick_device: no devices to pick from (got {n_devices})")
    return local % n_devices


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _use_cupy(source: str) -> Device:
    try:
        import cupy  # noqa: PLC0415 - optional dependency
    except ModuleNotFoundError as exc:
        if exc.name != "cupy":
            raise BackendError(f"{source}: CuPy is installed but does not import "
                               f"({_first_line(exc)})") from exc
        raise BackendError(f"{source}: CuPy is not installed (pip install -e '.[gpu]')") from exc
    except ImportError as exc:  # e.g. its CUDA libraries are missing
        raise BackendError(f"{source}: CuPy is installed but does not import "
                           f"({_first_line(exc)})") from exc
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError when there is no driver or no device
        raise BackendError(f"{source}: no CUDA device is available here "
                           f"({_first_line(exc)})") from exc
    if n == 0:
        raise BackendError(f"{source}: no CUDA device is available here")
    index = pick_device(local_rank(), n)
    try:
        cupy.cuda.Device(index).use()
    except Exception as exc:
        raise BackendError(f"{source}: CuPy cannot use GPU {index} ({_first_line(exc)})") from exc
    _check_libraries(cupy, index, source)
    return CuPyDevice(cupy, index, n)


def _gpu_probes(cupy):
    """(what, library, probe) for every CUDA library a training step uses: CuPy compiles its
    elementwise, reduction and indexing kernels with NVRTC at run time, matmuls call cuBLAS, and
    the embedding backward sorts (CUB, built into CuPy)."""
    def kernels():
        x = cupy.arange(6, dtype="float32")
        return float(cupy.multiply(x, 2.0).sum()) + float(x[cupy.arange(2)].sum())

    def matmul():
        for dtype in ("float32", "float64"):
            a = cupy.arange(12, dtype=dtype).reshape(3, 4)
            float(cupy.matmul(a, a.T).sum())

    def sort():
        int(cupy.argsort(cupy.arange(5)[::-1])[0])

    return [("an elementwise kernel and a reduction", "NVRTC", kernels),
            ("a matmul", "cuBLAS", matmul), ("a sort", "CUB", sort)]


def _check_libraries(cupy, index: int, source: str) -> None:
    """Run a tiny piece of each kind of GPU work now, so that a missing CUDA library (CuPy's pip
    wheel brings none unless installed with its ``ctk`` extra) or a driver too old for this CuPy
    stops the run at start-up with one line saying what to install, not mid-run."""
    try:
        major = int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:  # a runtime too broken to say: the probes will tell
        major = 12
    for what, library, probe in _gpu_probes(cupy):
        try:
            probe()
        except Exception as exc:
            why = _first_line(exc)
            if any(k in why.lower() for k in ("lib", ".so", "dll", "not found", "no module")):
                fix = (f"install CUDA's libraries from PyPI: pip install 'cupy-cuda{major}x[ctk]' "
                       "(pip install -e '.[gpu]' does)")
            else:
                fix = "the NVIDIA driver may be too old for this CuPy (see nvidia-smi)"
            raise BackendError(f"{source}: CuPy cannot run {what} ({library}) on GPU {index} "
                               f"({why}); {fix}") from exc


def _use_strict(source: str) -> Device:
    try:
        dev = StrictDevice()
    except BackendError as exc:
        raise BackendError(f"{source}: {exc}") from exc
    dev.select(pick_device(local_rank(), dev.count))  # as CuPy's ranks pick their GPU
    return dev


def use(backend: str, *, source: str | None = None) -> ModuleType:
    """Select the backend by name; raises ``BackendError`` with a one-line reason if unusable.

    ``source`` names where the choice came from in that line (default ``--backend NAME``).
    """
    global _active
    source = source or f"--backend {backend}"
    if backend == "numpy":
        _active = Device()
    elif backend == "cupy":
        _active = _use_cupy(source)
    elif backend == "strict":
        _active = _use_strict(source)
    else:
        raise BackendError(f"{source}: unknown backend {backend!r} "
                           f"(choose {', '.join(BACKENDS)})")
    return _active.xp


def use_from_env() -> ModuleType:
    """Select the backend named by ``MINIPAR_BACKEND`` (default numpy): lessons and tests."""
    chosen = os.environ.get("MINIPAR_BACKEND", "") or "numpy"
    return use(chosen, source=f"MINIPAR_BACKEND={chosen}")


def to_host(a) -> numpy.ndarray:
    """A NumPy copy (or view) of an array from the current backend."""
    return _active.to_host(a)


def from_host(a: numpy.ndarray):
    """Move a host array onto the current backend's device (no copy for NumPy)."""
    return _active.from_host(a)


def synchronize() -> None:
    """Wait for the device's queued work (a no-op on the host)."""
    _active.synchronize()
