"""Run ``python -m minipar.train`` in this process: one call of ``main(argv)`` per rank, on a
world of one or on a thread world, with the output captured. Much cheaper than a subprocess
(no interpreter start, no imports), so the CLI's many cases can each run."""

from __future__ import annotations

import contextlib
import io
import threading

from minipar.dist.comm import local_comm, run_threads
from minipar.train.cli import main

_LOCK = threading.Lock()


class _PerThread(io.TextIOBase):
    """sys.stdout/sys.stderr stand-in: each rank thread writes to its own buffer."""

    def __init__(self):
        self.buffers: dict[int, io.StringIO] = {}

    def write(self, s: str) -> int:
        return self.buffers.setdefault(threading.get_ident(), io.StringIO()).write(s)

    def text(self) -> str:
        return "".join(b.getvalue() for b in self.buffers.values())


def train(argv: list[str], n: int = 1, timeout: float = 120.0) -> tuple[list[int], str, str]:
    """(every rank's exit code, stdout, stderr) of ``minipar.train argv`` on ``n`` ranks; a
    rank waiting more than ``timeout`` seconds on a collective raises instead of hanging."""
    out, err = _PerThread(), _PerThread()
    with _LOCK, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if n == 1:
            codes = [_exit_code(lambda: main(argv, world=local_comm()))]
        else:
            codes = run_threads(lambda world: _exit_code(lambda: main(argv, world=world)), n,
                                timeout=timeout)
    return codes, out.text(), err.text()


def _exit_code(fn) -> int:
    try:
        return fn()
    except SystemExit as exc:  # argparse's usage errors and --help
        return exc.code if isinstance(exc.code, int) else 1
