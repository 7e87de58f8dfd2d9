"""Helpers for tests that launch the command-line tools as a user would."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mpirun_path() -> str:
    """The mpirun beside this interpreter (the mpich wheel), else one on PATH; fails if none."""
    local = Path(sys.executable).parent / "mpirun"
    found = str(local) if local.exists() else shutil.which("mpirun")
    assert found, "no mpirun next to the interpreter or on PATH: install the mpich wheel"
    return found


def env_one_thread() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONUNBUFFERED", None)
    return env


def run(args, n: int | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """``python -m ...args`` (under ``mpirun -n n`` when n is given), output captured."""
    cmd = [sys.executable, *args]
    if n is not None:
        cmd = [mpirun_path(), "-n", str(n), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env_one_thread(), **kw)
