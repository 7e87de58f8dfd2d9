"""``python -m minipar.bench --contention``: the training step beside a busy process.

A rank rarely has its machine to itself: another job, or more ranks than cores under
``mpirun``. A step whose threads meet at a barrier per small operation then slows down by far
more than the CPU it lost (the issue measured 744 ms instead of 4.4 ms for one attention
product). This times the same serial step alone and beside one process that spins on a core,
the two interleaved step by step, and reports the slowdown. With c cores and one of them taken,
a step that degrades in proportion to the CPU it gets is c / (c - 1/2) to c / (c - 1) slower
(2 cores: 1.3x to 2x, the busy process getting half a core or a whole one); the target is at
most ~2.5x.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def busy_process(seconds: float) -> subprocess.Popen:
    """A Python process that keeps one core busy for ``seconds`` (then exits by itself)."""
    return subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure_contention(step, n: int, warmup: int = 2, seconds: float = 600.0) -> dict:
    """Median seconds of ``step()`` (returning (seconds, loss)) alone and beside a busy process,
    interleaved step by step: the busy process is paused (SIGSTOP) for the steps timed alone
    and resumed (SIGCONT) for the others, so a change of load on a shared machine hits both
    alike. The busy process never outlives ``seconds``."""
    import signal
    import statistics

    spinner = busy_process(seconds)
    alone: list[float] = []
    busy: list[float] = []
    try:
        time.sleep(0.2)  # let it start spinning
        for i in range(warmup + n):
            for paused, out in ((True, alone), (False, busy)):
                os.kill(spinner.pid, signal.SIGSTOP if paused else signal.SIGCONT)
                os.waitpid(spinner.pid, os.WUNTRACED if paused else os.WCONTINUED)  # it took
                seconds_taken, _ = step()
                if i >= warmup:
                    out.append(seconds_taken)
    finally:
        spinner.kill()
        spinner.wait()
    alone_s, busy_s = statistics.median(alone), statistics.median(busy)
    return {"alone_s": alone_s, "busy_s": busy_s, "slowdown": busy_s / alone_s,
            "cores": os.cpu_count() or 1,
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def format_contention(c: dict) -> str:
    return (f"beside a busy process: {c['busy_s'] * 1e3:.0f} ms per step against "
            f"{c['alone_s'] * 1e3:.0f} ms alone = {c['slowdown']:.2f}x slower "
            f"({c['cores']} cores, load average {c['load_avg_1min']:.1f}; target <= ~2.5x)")


__all__ = ["busy_process", "measure_contention", "format_contention"]
