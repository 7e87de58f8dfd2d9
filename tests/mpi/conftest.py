"""pytest under real ``mpirun``: one pytest process per rank, all running the same tests.

Launched by ``tests/test_mpi_launch.py`` as
``mpirun -n N python -m mpi4py -m pytest -x -q -p no:cacheprovider tests/mpi`` with
``MINIPAR_UNDER_MPI=1`` (the single-process run ignores this folder). What keeps N copies of
pytest in step, for any test file added here:

- every rank collects and runs the same tests in the same order, so their collectives match;
- hypothesis is derandomized, so every rank draws (and shrinks) the same examples;
- assertions are collective (``minipar.dist.assertions.collective_assert``): all ranks fail
  together;
- a rank whose session fails aborts the whole job (``MPI.COMM_WORLD.Abort``), as ``python -m
  mpi4py`` also does, so nothing waits forever for it; pytest-timeout (thread method, which can
  interrupt a rank blocked inside MPI) bounds each test at ``DEFAULT_TIMEOUT_S``;
- only rank 0 prints pytest's report; another rank prints one line per failure on stderr;
- at the end rank 0 prints ``minipar-mpi: N ranks agree: passed=.. failed=.. skipped=..
  errors=.. deselected=..`` after gathering every rank's counts, which the launcher checks.

Fixtures: ``world``, the job's ``MPIComm`` (with ``check=True``: ranks that disagree on a
collective get a ``CommError`` instead of a hang).
"""

from __future__ import annotations

import os
import sys
import time

import pytest
from hypothesis import HealthCheck, settings
from mpi4py import MPI

from minipar.dist.comm import MPIComm

RANK = MPI.COMM_WORLD.Get_rank()
SIZE = MPI.COMM_WORLD.Get_size()
DEFAULT_TIMEOUT_S = 120  # per test; the launcher's own limit for the whole run is 240 s

settings.register_profile("minipar-mpi", derandomize=True, deadline=None, database=None,
                          print_blob=False, suppress_health_check=list(HealthCheck))
settings.load_profile("minipar-mpi")

_counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0}


@pytest.fixture(scope="session")
def world() -> MPIComm:
    return MPIComm.world(check=True)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if RANK == 0:
        return
    # Other ranks report into /dev/null: one readable report instead of N interleaved ones.
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        config.pluginmanager.unregister(reporter)
        quiet = pytest.TerminalReporter(config, open(os.devnull, "w"))  # noqa: SIM115
        config.pluginmanager.register(quiet, "terminalreporter")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_S))


def pytest_deselected(items: list[pytest.Item]) -> None:
    _counts["deselected"] += len(items)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _counts["errors"] += 1
        _say_failure(report.nodeid or "collection", report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _counts["skipped"] += 1
    elif report.failed:
        _counts["failed" if report.when == "call" else "errors"] += 1
        _say_failure(f"{report.nodeid} ({report.when})", report)
    elif report.when == "call":
        _counts["passed"] += 1


def _say_failure(where: str, report) -> None:
    if RANK == 0:
        return  # rank 0's full report is on stdout
    crash = getattr(report.longrepr, "reprcrash", None)
    why = crash.message.splitlines()[0] if crash is not None else str(report.longrepr)[:300]
    print(f"minipar-mpi: rank {RANK}: FAILED {where}: {why}", file=sys.stderr, flush=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    failed = _counts["failed"] + _counts["errors"]
    if failed or getattr(config, "_minipar_status", 0):
        sys.stdout.flush()
        sys.__stdout__.flush()  # the terminal reporter writes to the real stdout
        print(f"minipar-mpi: rank {RANK}: session failed; aborting the job", file=sys.stderr,
              flush=True)
        if RANK != 0:
            time.sleep(2)  # let rank 0 finish printing its report before the job goes down
        MPI.COMM_WORLD.Abort(1)
    # Every rank got here, so this gather cannot strand anyone.
    everyone = MPI.COMM_WORLD.gather(dict(_counts), root=0)
    if RANK == 0:
        fields = " ".join(f"{k}={v}" for k, v in everyone[0].items())
        if all(c == everyone[0] for c in everyone):
            print(f"minipar-mpi: {SIZE} ranks agree: {fields}", flush=True)
        else:
            print(f"minipar-mpi: ranks disagree: {everyone}", flush=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._minipar_status = int(exitstatus)
