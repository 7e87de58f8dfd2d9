"""Shared pytest setup for the whole suite.

``tests/mpi/`` holds tests that only make sense with one process per rank under real ``mpirun``.
The ordinary single-process run ignores that folder; ``tests/test_mpi_launch.py`` launches it
under ``mpirun -n N`` with ``MINIPAR_UNDER_MPI=1``, which makes this file collect it.
"""

import os
import sys

# Shared test bodies (comm_cases.py, ...) live next to this file; tests/mpi/ imports them too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

UNDER_MPI = os.environ.get("MINIPAR_UNDER_MPI") == "1"

collect_ignore = [] if UNDER_MPI else ["mpi"]

# ``MINIPAR_BACKEND=cupy pytest`` runs the suite on the GPU (``strict``: on the CPU stand-in for
# one, see minipar.backend.strict). Where the requested backend cannot run (no CuPy, no CUDA device),
# every test is skipped with the one-line reason: asked for the GPU, nothing here can answer.
# Unset (CI), the numpy backend is used and nothing is skipped.
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
