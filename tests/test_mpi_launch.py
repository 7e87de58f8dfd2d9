"""Run tests/mpi/ under real ``mpirun -n 2`` and ``-n 4`` from the ordinary pytest run.

The MPI path is proven, not assumed: if mpirun is missing, the launch fails, times out, or any
test there is skipped, deselected or fails, this test fails (a skip is not a pass). Each launch
runs in its own process group, so a hung job is killed whole (no orphaned ranks).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = 240  # a deadlock must fail the suite, not hang it
BAD_OUTCOMES = ("failed", "error", "errors", "skipped", "deselected", "xfailed", "xpassed")
AGREE = re.compile(r"^minipar-mpi: (\d+) ranks agree: passed=(\d+) failed=(\d+) skipped=(\d+) "
                   r"errors=(\d+) deselected=(\d+)$", re.M)
SUMMARY = re.compile(r"^(?:=+ )?((?:\d+ [a-z]+)(?:, \d+ [a-z]+)*) in [\d.]+s\b.*$", re.M)


def find_mpirun() -> str:
    """``mpirun`` next to this Python (the ``mpich`` wheel's), else on PATH; else fail."""
    here = Path(sys.executable).parent / "mpirun"
    if here.exists():
        return str(here)
    found = shutil.which("mpirun")
    if found is None:
        pytest.fail(f"mpirun is not next to {sys.executable} nor on PATH: the MPI tests cannot "
                    f"run. Install the 'mpich' wheel (pip install -e '.[dev]') or an MPI.")
    return found


def launch(n: int, args: list[str], timeout: float = LAUNCH_TIMEOUT_S) -> tuple[int, str, float]:
    """Run ``mpirun -n n <python> args`` in the repo; (return code, output, seconds)."""
    env = dict(os.environ, MINIPAR_UNDER_MPI="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [find_mpirun(), "-n", str(n), sys.executable, *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        pytest.fail(f"`{' '.join(cmd)}` did not finish in {timeout} s (deadlock?); output "
                    f"tail:\n{out[-3000:]}")
    return proc.returncode, out, time.perf_counter() - t0


def _kill_group(proc: subprocess.Popen) -> None:
    """End mpirun and every rank it started (they share the new session's process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def parse_summaries(output: str) -> list[dict[str, int]]:
    """Every pytest summary line in ``output`` ("3 passed, 1 skipped in 2.1s") as counts."""
    return [{word: int(num) for num, word in re.findall(r"(\d+) ([a-z]+)", m.group(1))}
            for m in SUMMARY.finditer(output)]


def problems(output: str, n: int) -> list[str]:
    """Why a launch's output does not show a clean pass on all n ranks ([] when it does)."""
    found = []
    summaries = parse_summaries(output)
    if not summaries:
        found.append("no pytest summary line")
    for counts in summaries:
        bad = {k: v for k, v in counts.items() if k in BAD_OUTCOMES and v}
        if bad:
            found.append(f"summary has {bad}")
        if counts.get("passed", 0) <= 0:
            found.append(f"summary without passed tests: {counts}")
    agree = AGREE.findall(output)
    if len(agree) != 1:
        found.append(f"expected one 'minipar-mpi: {n} ranks agree' line, found {len(agree)}")
    else:
        ranks, passed, *others = (int(v) for v in agree[0])
        if ranks != n or passed <= 0 or any(others):
            found.append(f"ranks agree line: ranks={ranks} passed={passed} others={others}")
        elif any(c.get("passed") != passed for c in summaries):
            found.append(f"rank counts {passed} passed differ from the summary {summaries}")
    return found


@pytest.mark.parametrize("n", (2, 4))
def test_mpi_suite(n):
    rc, out, seconds = launch(n, ["-m", "mpi4py", "-m", "pytest", "-x", "-q", "-p",
                                  "no:cacheprovider", "tests/mpi"])
    report = f"mpirun -n {n} (rc {rc}, {seconds:.1f} s) output tail:\n{out[-4000:]}"
    assert rc == 0, report
    assert problems(out, n) == [], report


def test_3d_layouts_at_8_ranks():
    """dp 2 x tp 2 x pp 2 (1F1B with ZeRO-1, and more) under a real 8-rank mpirun, and the
    cost model's predicted bytes against what those ranks record."""
    rc, out, seconds = launch(8, ["-m", "mpi4py", "-m", "pytest", "-x", "-q", "-p",
                                  "no:cacheprovider", "tests/mpi/test_3d_mpi.py",
                                  "tests/mpi/test_comm_prediction_mpi.py",
                                  "tests/mpi/test_dropout_mpi.py::"
                                  "test_composed_layout_with_dropout_equals_serial"])
    report = f"mpirun -n 8 (rc {rc}, {seconds:.1f} s) output tail:\n{out[-4000:]}"
    assert rc == 0, report
    assert problems(out, 8) == [], report


def test_abort_handler_ends_the_job_with_one_line():
    """A rank that raises takes the job down at once, printing the error once, no traceback."""
    code = ("from minipar.dist.comm import MPIComm, install_abort_handler\n"
            "w = MPIComm.world()\n"
            "install_abort_handler(w)\n"
            "if w.rank == 1:\n"
            "    raise ValueError('rank one failed on purpose')\n"
            "w.barrier()\n")  # rank 0 would wait here forever without the handler
    env_debug = os.environ.pop("MINIPAR_DEBUG", None)
    try:
        rc, out, seconds = launch(2, ["-c", code], timeout=60)
    finally:
        if env_debug is not None:
            os.environ["MINIPAR_DEBUG"] = env_debug
    assert rc != 0, out
    assert out.count("minipar: error on rank 1: ValueError: rank one failed on purpose") == 1, out
    assert "Traceback" not in out, out
    assert seconds < 30, out


def test_parser_handles_copies_skips_and_missing_lines():
    ok = "....\n20 passed in 0.39s\nminipar-mpi: 2 ranks agree: passed=20 failed=0 skipped=0 " \
         "errors=0 deselected=0\n"
    assert problems(ok, 2) == []
    assert problems(ok, 4) != []  # the wrong number of ranks
    two_copies = "20 passed in 0.4s\n" + ok
    assert problems(two_copies, 2) == []
    skipped = ok.replace("20 passed in", "19 passed, 1 skipped in")
    assert any("skipped" in p for p in problems(skipped, 2))
    decorated = "===== 3 passed, 2 deselected, 1 warning in 1.20s =====\n"
    assert parse_summaries(decorated) == [{"passed": 3, "deselected": 2, "warning": 1}]
    assert any("deselected" in p for p in problems(decorated, 2))
    assert problems("no tests ran in 0.01s\n", 2) != []
    assert problems(ok.replace("skipped=0", "skipped=1"), 2) != []
