"""Test helpers that are safe with several ranks: assertions every rank agrees on.

Under ``mpirun`` a plain ``assert`` that fails on one rank leaves the other ranks waiting in
their next collective forever. A *collective* assertion first tells every rank every rank's
verdict, then all ranks raise together, naming the ranks that failed and why.
"""

from __future__ import annotations

import numpy

from minipar import backend
from minipar.dist.comm import Comm


def collective_assert(comm: Comm, ok: bool, msg: str) -> None:
    """Raise ``AssertionError`` on every rank of ``comm`` if ``ok`` is false on any rank.

    A collective: every rank must call it. The exchange is not recorded in ``comm.stats``
    (test bookkeeping is not the traffic under test).
    """
    with comm.stats.paused():
        verdicts = comm.allgather_obj((bool(ok), "" if ok else str(msg)))
    failed = [(r, m) for r, (good, m) in enumerate(verdicts) if not good]
    if failed:
        ranks = ", ".join(str(r) for r, _ in failed)
        details = "; ".join(f"rank {r}: {m}" for r, m in failed)
        raise AssertionError(f"failed on rank(s) {ranks} of {comm!r}: {details}")


def assert_allclose_collective(comm: Comm, actual, desired, rtol: float, atol: float = 0.0,
                               what: str = "") -> None:
    """``numpy.testing.assert_allclose`` on every rank, failing on all ranks together."""
    try:
        numpy.testing.assert_allclose(backend.to_host(actual), backend.to_host(desired),
                                      rtol=rtol, atol=atol)
        ok, msg = True, ""
    except AssertionError as exc:
        # numpy's report: a blank line, the tolerance line, mismatch counts, then the arrays.
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        ok, msg = False, f"{what or 'arrays'} not close: " + " | ".join(lines[:4])
    collective_assert(comm, ok, msg)
