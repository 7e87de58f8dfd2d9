"""Faults end the job quickly and say why: a killed rank, a raising rank, non-finite numbers,
and ranks that disagree on a collective (with --check-collectives)."""

import json
import signal
import subprocess
import sys
import time

from cli_util import REPO, env_one_thread, mpirun_path, run

TRAIN = ["-m", "minipar.train", "--quiet"]


def _rank_pids(parent: int) -> list[int]:
    """The Python rank processes under an mpirun (children of its hydra proxy)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True)
    rows = [line.split(None, 2) for line in out.stdout.splitlines()]
    kids = {parent}
    for _ in range(3):  # mpirun -> hydra proxy -> ranks
        kids |= {int(pid) for pid, ppid, _ in rows if int(ppid) in kids}
    return [int(pid) for pid, ppid, args in rows
            if int(pid) in kids and "minipar.train" in args and "mpirun" not in args]


def test_killing_one_rank_ends_the_whole_job_quickly():
    cmd = [mpirun_path(), "-n", "4", sys.executable, *TRAIN, "--steps", "100000",
           "--eval-every", "100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env_one_thread(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(pids := _rank_pids(proc.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(pids) == 4, f"expected 4 ranks, found {pids}"
        time.sleep(2.0)  # let them reach the training loop
        t0 = time.monotonic()
        import os

        os.kill(pids[-1], signal.SIGKILL)
        rc = proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
        assert rc != 0 and elapsed < 30, (rc, elapsed)
    finally:
        if proc.poll() is None:
            import os

            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


RAISE_ON_ONE_RANK = """
import numpy as np
from minipar.dist.comm import MPIComm, install_abort_handler
world = MPIComm.world()
install_abort_handler(world)
if world.rank == 2:
    raise ValueError("something broke on this rank")
world.allreduce(np.ones(4))   # the other ranks wait here for rank 2, which never comes
world.barrier()
"""


def test_a_rank_that_raises_takes_the_job_down_with_one_message(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text(RAISE_ON_ONE_RANK)
    t0 = time.monotonic()
    out = run([str(script)], n=4, timeout=60)
    assert out.returncode != 0 and time.monotonic() - t0 < 30
    lines = [ln for ln in out.stderr.splitlines() if "something broke" in ln]
    assert lines == ["minipar: error on rank 2: ValueError: something broke on this rank"]
    assert "Traceback" not in out.stderr


MISMATCH = """
import numpy as np
from minipar.dist.comm import MPIComm, install_abort_handler
world = MPIComm.world(check=True)
install_abort_handler(world)
world.allreduce(np.ones(3))
world.allreduce(np.ones(3 + world.rank))   # rank 1 passes a different shape
"""


def test_check_collectives_reports_a_mismatch_instead_of_hanging(tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH)
    out = run([str(script)], n=2, timeout=60)
    assert out.returncode != 0
    assert "rank 1 disagrees with rank 0" in out.stderr
    assert "allreduce((3,), <f8, sum) at" in out.stderr and "mismatch.py:7" in out.stderr


def test_nonfinite_loss_stops_with_the_step_named(tmp_path):
    out = run([*TRAIN, "--optimizer", "sgd", "--lr", "1e300", "--steps", "20"], n=2)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "non-finite" in errors[0] and "at step 2" in errors[0]


def test_nonfinite_steps_can_be_skipped(tmp_path):
    path = tmp_path / "s.json"
    out = run([*TRAIN, "--optimizer", "sgd", "--lr", "1e300", "--steps", "4", "--eval-every",
               "4", "--skip-nonfinite", "--summary", str(path)])
    assert out.returncode == 0, out.stderr

    def not_json(name):
        raise ValueError(f"{name} is not JSON")

    summary = json.loads(path.read_text(), parse_constant=not_json)  # NaN, Infinity refused
    assert summary["skipped_steps"] == [2, 3, 4]
    assert summary["losses"][1:] == [None, None, None]  # non-finite losses are null
    assert "step 2: non-finite loss or gradients, step skipped" in out.stdout + out.stderr
