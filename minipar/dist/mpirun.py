"""Start an ``mpirun`` job from Python: this interpreter, one BLAS thread a rank, a timeout.

Lessons, notebooks, benchmarks and tests launch real multi-process jobs through ``mpirun``. A
bare ``mpirun`` on the PATH may belong to another MPI than the one mpi4py was built against, and
a job that deadlocks would hang the caller forever; this module finds the ``mpirun`` next to the
interpreter (the ``mpich`` wheel's), streams the ranks' output, and kills the whole job (its own
process group) on a timeout or an interrupt, raising with the output's tail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path


class MPIRunError(RuntimeError):
    """An ``mpirun`` job failed or timed out; the message holds the command and its output."""


def find_mpirun() -> str:
    """The ``mpirun`` next to this interpreter (the ``mpich`` wheel's), else the one on PATH."""
    here = Path(sys.executable).parent / "mpirun"  # not resolved: a venv's python is a symlink
    if here.exists():
        return str(here)
    found = shutil.which("mpirun")
    if found is None:
        raise MPIRunError(f"no mpirun next to {sys.executable} nor on PATH: "
                          "pip install mpich (or load your cluster's MPI module)")
    return found


def mpirun(n: int, args: list[str], *, timeout: float = 300, stream: bool = True,
           env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> str:
    """Run ``mpirun -n n python ARGS`` with this interpreter; returns the ranks' output.

    ``args`` follow the interpreter, e.g. ``mpirun(4, ["-m", "minipar.train", "--steps", "20"])``.
    Each rank gets one BLAS/OpenMP thread (``n`` ranks share the cores; more threads per rank
    slow every rank down); ``env`` adds or overrides variables. With ``stream`` the output is
    printed line by line as it arrives; a rank's line arrives whole when it prints with
    ``flush=True`` (``PYTHONUNBUFFERED`` is unset for the ranks so that lines do not mix).
    A non-zero exit or a run past ``timeout`` seconds kills the whole job and raises
    ``MPIRunError`` with the output.
    """
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive number of ranks, got {n!r}")
    cmd = [find_mpirun(), "-n", str(n), sys.executable, *map(str, args)]
    run_env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
    # Unbuffered ranks write each piece of a print separately, so lines of different ranks mix
    # mid-line; buffered, a print(..., flush=True) is one write and arrives whole.
    run_env.pop("PYTHONUNBUFFERED", None)
    run_env.update(env or {})
    # Own session: on timeout we can end mpirun and every rank it started, and nothing else.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=run_env, cwd=cwd, start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if stream:
                print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(5)
        raise MPIRunError(_failure(cmd, f"timed out after {timeout} s", lines)) from None
    except BaseException:  # KeyboardInterrupt in a notebook: do not leave ranks running
        _kill_group(proc)
        raise
    reader.join()
    if code != 0:
        raise MPIRunError(_failure(cmd, f"exited with code {code}", lines))
    return "".join(lines)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 3)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _failure(cmd: list[str], what: str, lines: list[str], tail: int = 60) -> str:
    shown = "".join(lines[-tail:]) or "(no output)\n"
    return f"{' '.join(cmd)} {what}; last output:\n{shown}"
