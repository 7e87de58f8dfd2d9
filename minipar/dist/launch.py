"""Process set-up that must happen before NumPy is imported: BLAS threads and the rank's identity.

With several ranks on one machine, each BLAS library spawning one thread per core makes the
ranks fight for the cores: measured here, 4 ranks with default OpenBLAS threads ran matmuls ~5x
slower than with one thread each. So each rank gets cores / local ranks threads, unless the user
set ``OMP_NUM_THREADS`` (or ``MINIPAR_THREADS``, or ``--threads N`` on the command line).

It also keeps freed activation memory in the process heap (``keep_freed_memory``): by default
glibc returns every large block to the kernel on free and maps fresh pages on the next
allocation, so each training step paid page faults for all of its activations again (measured
here: the ``small`` preset's step ran about 30% faster with the memory kept).

And it tells OpenBLAS's own threads to sleep as soon as a call ends (``OPENBLAS_THREAD_TIMEOUT``):
by default each spins for about 2^28 cycles (~0.1 s) waiting for the next call, a whole core
taken from minipar's kernel workers (``minipar.nn.threads``), which run one-thread BLAS calls
and NumPy loops beside it. Measured here: after one two-thread product, the linear layer's
row-blocked (2048, 384) x (384, 384) product took 4.5 ms instead of 2.3 ms for as long as the
spinning lasted.

This module imports nothing heavy; call ``configure_threads()`` first thing in an entry point.
"""

from __future__ import annotations

import os
import sys

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS")
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def _first_int(names, default: int) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.split("(")[0].isdigit():
            return int(value.split("(")[0])
    return default


def env_rank() -> int:
    """This process's rank as the launcher announced it (0 when not launched by MPI)."""
    return _first_int(_RANK_VARS, 0)


def env_world_size() -> int:
    return _first_int(_SIZE_VARS, 1)


def local_ranks() -> int:
    """Ranks sharing this machine (so sharing its cores)."""
    return max(1, _first_int(_LOCAL_SIZE_VARS, env_world_size()))


def _argv_threads(argv) -> int | None:
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        if arg.startswith("--threads=") and arg.split("=", 1)[1].isdigit():
            return int(arg.split("=", 1)[1])
    return None


def keep_freed_memory() -> bool:
    """Ask glibc to serve large arrays from the heap and keep freed memory for reuse.

    Returns False (and changes nothing) where there is no glibc or ``MINIPAR_MALLOC=default``.
    """
    if os.environ.get("MINIPAR_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from glibc's malloc.h
    # mallopt takes a C int: values must stay below 2**31.
    ok = libc.mallopt(m_mmap_threshold, 1 << 30)  # arrays below 1 GiB come from the heap
    ok &= libc.mallopt(m_trim_threshold, (1 << 31) - 1)  # keep up to 2 GiB of freed memory
    ok &= libc.mallopt(m_top_pad, 256 << 20)  # grow the heap 256 MiB at a time
    return bool(ok)


def configure_threads(argv=None) -> int:
    """Set the BLAS thread count for this rank before NumPy loads; returns the count chosen.

    Also keeps freed memory for reuse (``keep_freed_memory``) and stops OpenBLAS's threads
    spinning between calls, which every entry point wants.
    """
    keep_freed_memory()
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # 2^4 cycles: sleep at once
    argv = sys.argv[1:] if argv is None else argv
    requested = _argv_threads(argv) or _first_int(("MINIPAR_THREADS",), 0)
    if requested:
        n = requested
    elif "OMP_NUM_THREADS" in os.environ:
        return int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else 0
    else:
        n = max(1, (os.cpu_count() or 1) // local_ranks())
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    return n
