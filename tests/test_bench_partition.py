"""``python -m minipar.bench --partition``: the measured bubble read from a trace, and the command
end to end on a tiny model under mpirun."""

from __future__ import annotations

import pytest

from cli_util import run
from minipar.bench.partition import step_bubbles
from minipar.observe.trace import to_chrome_trace


def test_step_bubbles_of_a_hand_made_trace():
    """Two stages, one step: stage 0 computes 0-2 and 5-6 (busy 3), stage 1 computes 2-5
    (busy 3), a send and the optimizer step do not count; the last pass ends at 6, so the
    bubble is 1 - 6 / (2 x 6) = 1/2. Events of other steps (or none: evaluation) are apart."""
    def ev(rank, kind, start, end, step=1):
        args = {} if step is None else {"step": step}
        return {"rank": rank, "name": kind, "kind": kind, "start": start, "end": end,
                "args": args}

    events = [ev(0, "fwd", 0, 2), ev(0, "send", 2, 2.5), ev(1, "fwd", 2, 3),
              ev(1, "bwd", 3, 5), ev(0, "bwd", 5, 6), ev(0, "step", 6, 7), ev(1, "step", 5, 7),
              ev(0, "fwd", 10, 11, step=2), ev(1, "bwd", 11, 14, step=2), ev(0, "fwd", 20, 30,
                                                                           step=None)]
    first, second = step_bubbles(to_chrome_trace(events), 2)
    assert first["step"] == 1 and first["bubble"] == pytest.approx(0.5)
    assert first["pipeline_s"] == pytest.approx(6.0) and first["busy_s"] == pytest.approx([3, 3])
    assert second["bubble"] == pytest.approx(1 - 4 / (2 * 4))


def test_bench_partition_runs_and_reports_both_splits():
    out = run(["-m", "minipar.bench", "--partition", "--layers", "4", "--d-model", "16",
               "--vocab", "512", "--batch-size", "8", "--microbatches", "4", "--steps", "3",
               "--warmup", "1"], timeout=180)
    assert out.returncode == 0, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith(("equal", "balanced"))]
    assert [r[0] for r in rows[:2]] == ["equal", "balanced"], out.stdout
    assert (rows[0][1], rows[1][1]) == ("2,2", "3,1")  # the head weighs about 2 blocks


def test_bench_partition_refuses_a_bad_split_in_one_line():
    out = run(["-m", "minipar.bench", "--partition", "--splits", "equal;3,3"], timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--partition 3,3" in lines[0], out.stderr
