"""Stragglers on purpose: slow a rank's compute in a controlled, reproducible way.

Real clusters have slow ranks (a busy node, a throttled GPU, a noisy neighbour). To measure what
a straggler costs synchronous training (the slowest rank sets every step's pace) and what
asynchronous training wins back, minipar can make a rank slow on purpose: after each compute the
rank sleeps for ``(factor - 1)`` times the compute it just did (``--straggler RANK:FACTOR``), plus,
with ``--jitter J``, an exponentially distributed extra of mean ``J`` times the compute, drawn
from a generator keyed by (seed, rank), so a run can be repeated.
"""

from __future__ import annotations

from typing import Callable

import numpy


def parse_straggler(text: str, world_size: int) -> tuple[int, float]:
    """``"RANK:FACTOR"`` -> (rank, factor); raises ValueError naming the flag."""
    try:
        rank_text, factor_text = text.split(":")
        rank, factor = int(rank_text), float(factor_text)
    except ValueError:
        raise ValueError(f"--straggler {text!r}: expected RANK:FACTOR, e.g. 1:3") from None
    if not 0 <= rank < world_size:
        raise ValueError(f"--straggler {text!r}: rank {rank} is not one of the {world_size} "
                         "ranks")
    if not factor >= 1.0:
        raise ValueError(f"--straggler {text!r}: the factor must be >= 1 (a slowdown)")
    return rank, factor


def make_delay(rank: int, straggler: tuple[int, float] | None = None, jitter: float = 0.0,
               seed: int = 0) -> Callable[[float], float] | None:
    """The extra seconds this rank sleeps after a compute of ``compute_s`` seconds, or None
    when it is not slowed at all."""
    if jitter < 0:
        raise ValueError(f"--jitter {jitter}: must be >= 0")
    factor = straggler[1] if straggler is not None and straggler[0] == rank else 1.0
    if factor == 1.0 and jitter == 0.0:
        return None
    rng = numpy.random.default_rng([seed, rank])

    def delay(compute_s: float) -> float:
        extra = rng.exponential(jitter) if jitter > 0 else 0.0
        return (factor - 1.0 + extra) * compute_s
    return delay


def delay_from_flags(straggler: str | None, jitter: float, rank: int, world_size: int,
                     seed: int = 0) -> Callable[[float], float] | None:
    """This rank's delay as ``--straggler RANK:FACTOR`` and ``--jitter J`` ask for it."""
    parsed = parse_straggler(straggler, world_size) if straggler else None
    return make_delay(rank, parsed, jitter, seed)
