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
