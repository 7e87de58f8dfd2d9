"""A killed worker or server in an asynchronous mode (--mode ps, ssp, local-sgd) ends the whole
job in seconds with mpirun's one line naming the signal, as a killed rank of a synchronous run
does (tests/test_faults.py): no survivor waits forever for a push, a pull or an average."""

import os
import signal
import subprocess
import sys
import time

import pytest

from cli_util import REPO, env_one_thread, mpirun_path
from test_faults import _rank_pids

RANKS = 3


def _rank_of(pid: int) -> int:
    """The MPI rank of a process that hydra started (it sets PMI_RANK in the environment)."""
    with open(f"/proc/{pid}/environ", "rb") as fh:
        env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
    return int(env[b"PMI_RANK"])


@pytest.mark.parametrize("flags, victim", [
    (["--mode", "ps"], 2),  # a worker
    (["--mode", "ps"], 0),  # the parameter server
    (["--mode", "ssp", "--staleness", "1", "--servers", "2"], 1),  # one of two server shards
    (["--mode", "local-sgd", "--sync-every", "2", "--batch-size", "66"], 1),
], ids=["ps-worker", "ps-server", "ssp-server-shard", "local-sgd-worker"])
def test_killing_one_rank_of_an_async_job_ends_it_quickly(flags, victim):
    cmd = [mpirun_path(), "-n", str(RANKS), sys.executable, "-m", "minipar.train", "--quiet",
           "--steps", "100000", "--eval-every", "100000", *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env_one_thread(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(pids := _rank_pids(proc.pid)) < RANKS and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(pids) == RANKS, f"expected {RANKS} ranks, found {pids}"
        pids = sorted(pids, key=_rank_of)
        time.sleep(3.0)  # let them reach the training loop
        assert proc.poll() is None, proc.communicate()[0]
        t0 = time.monotonic()
        os.kill(pids[victim], signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        elapsed = time.monotonic() - t0
        assert proc.returncode != 0 and elapsed < 30, (proc.returncode, elapsed)
        why = [ln for ln in out.splitlines() if "Killed (signal 9)" in ln]
        assert len(why) == 1 and "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
