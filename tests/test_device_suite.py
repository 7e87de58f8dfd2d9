"""CI runs the parallel == serial tests on the stand-in device too, so host-only tests cannot
creep back into them (a test that hands a kernel a NumPy array, or reads a result as one, fails
there, as it would on a GPU).

Why a subprocess: the backend is chosen once per process, when pytest starts
(``tests/conftest.py`` reads ``MINIPAR_BACKEND``), and layers cache device arrays. A child
``MINIPAR_BACKEND=strict python -m pytest <subset>`` is exactly what a developer runs by hand, so
this check and that command cannot drift apart.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from device_suite import PARALLEL_EQUALS_SERIAL

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
def test_parallel_equals_serial_on_the_stand_in_device():
    env = dict(os.environ, MINIPAR_BACKEND="strict", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *PARALLEL_EQUALS_SERIAL], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=840)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = re.findall(r"^(?:=+ )?(\d+ passed.*) in [\d.]+s", proc.stdout, re.M)
    assert proc.returncode == 0 and summary, tail
    bad = re.findall(r"\d+ (failed|skipped|error|errors|deselected|xfailed)", summary[-1])
    assert not bad, tail  # a skipped test is not a passing one


def test_ci_gpu_runs_every_step_under_a_timeout_within_ten_minutes():
    """``.ci/gpu --dry-run`` lists its commands: install with the gpu extra, the start-up check,
    bench on NumPy and CuPy, train serial and under mpirun -n 2 with --tp 2 and --pp 2, and the
    device suite; each runs under a timeout, all within the 10-minute budget. (The commands
    themselves ran end to end with ``.ci/gpu --backend strict``, the stand-in for the GPU.)"""
    proc = subprocess.run(["bash", str(REPO / ".ci" / "gpu"), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = re.findall(r"^== \[\d+ s\] \(timeout (\d+) s\) (.*)$", proc.stdout, re.M)
    commands = [c for _, c in steps]
    want = [r"pip install -q -e \.\[dev,gpu\]$", r"backend\.use\('cupy'\)",
            r"minipar\.bench --backend numpy", r"minipar\.bench --backend cupy",
            r"python -m minipar\.train --backend cupy", r"mpirun -n 2 .* --backend cupy --tp 2",
            r"mpirun -n 2 .* --backend cupy --pp 2",
            r"MINIPAR_BACKEND=cupy .* -m pytest .*test_pipeline_equals_serial"]
    assert len(commands) == len(want), commands
    for pattern, command in zip(want, commands):
        assert re.search(pattern, command), (pattern, command)
    assert all(0 < int(limit) <= 570 for limit, _ in steps)
    # every limit is cut to the budget
    assert "budget=\"${MINIPAR_GPU_BUDGET:-570}\"" in (REPO / ".ci" / "gpu").read_text()


def test_the_gpu_suite_names_tests_that_exist():
    from device_suite import ON_GPU

    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                           "no:cacheprovider", *ON_GPU], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout[-2000:]
