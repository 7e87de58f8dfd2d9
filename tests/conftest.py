"""Shared pytest setup for the whole suite.

``tests/mpi/`` holds tests that only make sense with one process per rank under real ``mpirun``.
The ordinary single-process run ignores that folder; ``tests/test_mpi_launch.py`` launches it
under ``mpirun -n N`` with ``MINIPAR_UNDER_MPI=1``, which makes this file collect it.
"""

import os
import sys

# In-process thread worlds run several ranks' BLAS calls at once in one process; with OpenBLAS's
# own threads on top they contend for the cores (measured on a loaded 2-core machine: a 4-rank
# pipeline run took 43 s instead of 0.8 s). One BLAS thread, as every mpirun rank gets, unless
# the caller set it. NumPy reads this when it loads, which is after this file.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

# Shared test bodies (comm_cases.py, ...) live next to this file; tests/mpi/ imports them too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

UNDER_MPI = os.environ.get("MINIPAR_UNDER_MPI") == "1"

collect_ignore = [] if UNDER_MPI else ["mpi"]

# ``MINIPAR_BACKEND=cupy pytest`` runs the suite on the GPU (``strict``: on the CPU stand-in for
# one, see minipar.backend.strict). Where the requested backend cannot run (no CuPy, no CUDA
# device), every test is skipped with the one-line reason: asked for the GPU, nothing here can
# answer. Unset (CI), the numpy backend is used and nothing is skipped.
_BACKEND_SKIP: list[str] = []


def pytest_configure(config) -> None:
    if os.environ.get("MINIPAR_BACKEND"):
        from minipar import backend

        try:
            backend.use_from_env()
        except backend.BackendError as exc:
            _BACKEND_SKIP.append(str(exc))


def pytest_collection_modifyitems(config, items) -> None:
    if _BACKEND_SKIP:
        import pytest

        for item in items:
            item.add_marker(pytest.mark.skip(reason=_BACKEND_SKIP[0]))
