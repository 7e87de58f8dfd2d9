"""Tracing, Chrome-trace export, and ASCII / PNG rendering of programs and timelines."""

from __future__ import annotations

import json
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.config import SCHEDULE_NAMES
from minipar.parallel.schedules import gpipe, make_schedule, one_f_one_b
from minipar.observe.render import ascii_timeline, plot_losses, plot_timeline
from minipar.sim.simulator import simulate, unit_cost
from minipar.observe.trace import Tracer, merge, timeline_events, to_chrome_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tracer_records_spans_with_args():
    tr = Tracer(rank=3)
    with tr.span("F0", "fwd", mb=0):
        with tr.span("allreduce", "allreduce", bytes=128):
            pass
    inner, outer = tr.events  # the inner span closes first
    assert (outer["name"], outer["kind"], outer["rank"], outer["args"]) == ("F0", "fwd", 3,
                                                                            {"mb": 0})
    assert inner["args"] == {"bytes": 128}
    assert 0 <= outer["start"] <= inner["start"] <= inner["end"] <= outer["end"]


def test_disabled_tracer_does_nothing():
    tr = Tracer(rank=0, enabled=False)
    a, b = tr.span("F0", "fwd"), tr.span("B0", "bwd", mb=1)
    assert a is b  # one shared no-op object: nothing allocated per span
    with a:
        pass
    assert tr.events == []


def test_merge_orders_ranks_by_time():
    r0 = [{"rank": 0, "name": "a", "kind": "fwd", "start": 0.0, "end": 1.0, "args": {}},
          {"rank": 0, "name": "c", "kind": "fwd", "start": 2.0, "end": 3.0, "args": {}}]
    r1 = [{"rank": 1, "name": "b", "kind": "fwd", "start": 1.0, "end": 2.0, "args": {}}]
    assert [e["name"] for e in merge([r0, r1])] == ["a", "b", "c"]


def test_chrome_trace_format(tmp_path):
    tl = simulate(one_f_one_b(2, 2), unit_cost(Fraction(1), Fraction(2)))
    events = timeline_events(tl)
    path = tmp_path / "trace.json"
    doc = to_chrome_trace(events, str(path))
    assert json.loads(path.read_text()) == doc
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    non_idle = [e for e in events if e["kind"] != "idle"]
    assert len(spans) == len(non_idle)
    for src, ev in zip(non_idle, spans):
        assert ev["pid"] == src["rank"] and ev["name"] == src["name"]
        assert ev["ts"] == src["start"] * 1e6 and ev["dur"] == (src["end"] - src["start"]) * 1e6
        assert ev["tid"] == {"fwd": 0, "bwd": 0, "send": 1, "recv": 1, "sync": 1}.get(
            ev["cat"], 2)
    names = {(e["pid"], e["args"]["name"]) for e in doc["traceEvents"] if e["ph"] == "M"}
    assert (0, "rank 0") in names and (1, "comm") in names


def test_timeline_events_are_plain_json():
    tl = simulate(make_schedule("interleaved", 2, 2, 2), unit_cost(Fraction(1), Fraction(2), 2))
    events = timeline_events(tl)
    json.dumps(events)
    fwd = [e for e in events if e["kind"] == "fwd"]
    assert all(isinstance(e["start"], float) for e in events)
    assert {(e["args"]["mb"], e["args"]["chunk"]) for e in fwd if e["rank"] == 0} == {
        (0, 0), (1, 0), (0, 1), (1, 1)}


# ----------------------------------------------------------------------------------- ASCII
@settings(max_examples=30, deadline=None)
@given(st.sampled_from(SCHEDULE_NAMES), st.integers(1, 6), st.integers(1, 4))
def test_ascii_program_lists_passes_in_order(name, p, k):
    prog = make_schedule(name, p, p * k, 2 if name == "interleaved" else 1)
    lines = str(prog).splitlines()
    assert str(prog) == ascii_timeline(prog)
    assert len(lines) == p + 1
    for s, line in enumerate(lines[1:]):
        head, row = line.split("|")
        assert head.split() == ["stage", str(s)]
        assert row.split() == [prog.label(i) for i in prog.compute(s)]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["gpipe", "1f1b"]), st.integers(1, 6), st.integers(1, 10))
def test_ascii_timeline_shows_idle_cells(name, p, m):
    """With unit costs every pass sits on the grid, so a stage's '..' count is its idle time."""
    tl = simulate(make_schedule(name, p, m), unit_cost(Fraction(1), Fraction(2)))
    text = ascii_timeline(tl, width=10_000)
    for s, line in enumerate(text.splitlines()[1:]):
        row = line.split("|")[1]
        cells = [row[i:i + 3] for i in range(1, len(row), 3)]
        assert sum(c.strip() == ".." for c in cells) == tl.idle[s]
        assert [c.strip() for c in cells if c.strip() not in ("", "..")] == [
            e.label for e in tl.stage_events(s) if e.kind in ("fwd", "bwd")]


def test_ascii_timeline_respects_width():
    tl = simulate(gpipe(4, 32), unit_cost())
    lines = ascii_timeline(tl, width=100).splitlines()
    assert all(len(line) <= 100 for line in lines[1:])
    assert ascii_timeline(gpipe(2, 2)).splitlines()[1] == "stage 0 | F0 F1 B0 B1"


# ----------------------------------------------------------------------------------- plots
def test_plots_write_pngs(tmp_path):
    tl = simulate(make_schedule("zb-h1", 4, 8), unit_cost())
    for src, name in ((tl, "sim.png"), (timeline_events(tl, include_idle=False), "ev.png")):
        path = tmp_path / name
        assert plot_timeline(src, str(path), title="zb-h1") == str(path)
        assert path.read_bytes()[:8] == PNG_MAGIC
    for losses, name in (([3.0, 2.0, 1.5], "l1.png"), ({"serial": [2, 1], "pp": [2, 1]},
                                                       "l2.png")):
        path = tmp_path / name
        plot_losses(losses, str(path))
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_plots_leave_the_notebook_backend_alone(tmp_path):
    """Saving a PNG must not switch matplotlib's backend: in a notebook that hides every later
    inline figure. Nor may it leave a pyplot figure behind for the notebook to draw again."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # any backend but Agg stands in for a notebook's inline backend
    try:
        plot_timeline(simulate(gpipe(2, 2), unit_cost()), str(tmp_path / "t.png"),
                      time_unit="unit costs")
        plot_losses([2.0, 1.0], str(tmp_path / "l.png"))
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == []
    finally:
        matplotlib.use(before)
