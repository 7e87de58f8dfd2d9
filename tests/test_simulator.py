"""The simulator reproduces the published pipeline bubbles exactly and times programs honestly."""

from __future__ import annotations

import dataclasses
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.parallel.program_checks import DeadlockError, check_program, route
from minipar.parallel.schedules import (
    RECVS, SENDS, Bwd, BwdInput, BwdWeight, Fwd, RecvAct, RecvGrad, SendAct, Step, SyncGrads, gpipe,
    interleaved, make_schedule, naive, one_f_one_b, zero_bubble_h1,
)
from minipar.sim.simulator import bubble_formula, simulate, unit_cost

ONE, TWO = Fraction(1), Fraction(2)


def exact_bubble(prog, v=1):
    tl = simulate(prog, unit_cost(ONE, TWO, v))
    return tl, tl.bubble_fraction


# ------------------------------------------------------------------- published bubble formulas
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16), st.integers(1, 64))
def test_gpipe_and_1f1b_bubble(p, m):
    """(p-1)/(m+p-1): Huang et al. 2018 for GPipe, Narayanan et al. 2021 for 1F1B."""
    for prog in (gpipe(p, m), one_f_one_b(p, m)):
        tl, bubble = exact_bubble(prog)
        assert bubble == Fraction(p - 1, m + p - 1)
        assert tl.makespan == 3 * (m + p - 1)
        assert tl.busy == [3 * m] * p


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.data(), st.integers(1, 4))
def test_interleaved_bubble(p, data, v):
    """(p-1)/(v*m+p-1), PTD-P (Narayanan et al. 2021); m a multiple of p as in Megatron-LM."""
    m = p * data.draw(st.integers(1, 64 // p))
    prog = interleaved(p, m, v)
    check_program(prog)
    _, bubble = exact_bubble(prog, v)
    assert bubble == Fraction(p - 1, v * m + p - 1)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.data())
def test_zb_h1_bubble(p, data):
    """Qi et al. 2023 with T_F = T_B = T_W = 1: idle (p-1)(T_F+T_B-T_W) = p-1 per stage beside
    3m of work, so (p-1)/(3m+p-1). The warm-up only fills when m >= p, so m is drawn there."""
    m = data.draw(st.integers(p, 64))
    prog = zero_bubble_h1(p, m)
    check_program(prog)
    tl, bubble = exact_bubble(prog)
    assert bubble == Fraction(p - 1, 3 * m + p - 1)
    assert tl.idle == [p - 1] * p
    # Against 1F1B the bubble shrinks from (p-1)(T_F+T_B+T_W) to (p-1)(T_F+T_B-T_W).
    _, ref = exact_bubble(one_f_one_b(p, m))
    assert ref == Fraction(3 * (p - 1), 3 * m + 3 * (p - 1))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 16), st.data())
def test_zb_h1_beats_1f1b_with_few_microbatches(p, data):
    """Below m = p the formula does not apply, but splitting W off still shortens the step."""
    m = data.draw(st.integers(1, p - 1))
    z, _ = exact_bubble(zero_bubble_h1(p, m))
    o, _ = exact_bubble(one_f_one_b(p, m))
    assert z.makespan < o.makespan


@pytest.mark.parametrize("p,m", [(1, 1), (2, 3), (4, 2), (5, 5)])
def test_naive_bubble(p, m):
    _, bubble = exact_bubble(naive(p, m))
    assert bubble == Fraction(p - 1, p) == bubble_formula("naive", p, m)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1"]), st.integers(1, 8),
       st.integers(1, 8), st.integers(1, 3))
def test_formula_helper_agrees_with_float_costs(name, p, k, v):
    """bubble_formula is what the simulator gives; float costs agree within 1e-12."""
    v = v if name == "interleaved" else 1
    m = p * k if name != "zb-h1" else p + k
    tl = simulate(make_schedule(name, p, m, v), unit_cost(1.0, 2.0, v))
    assert abs(tl.bubble_fraction - float(bubble_formula(name, p, m, v))) < 1e-12


# --------------------------------------------------------------------------- timing semantics
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 16), st.integers(0, 5))
def test_gpipe_with_latency(p, m, d):
    """Every hop adds d on the way forward and on the way back: (m+p-1)(F+B) + 2(p-1)d."""
    tl = simulate(gpipe(p, m), unit_cost(ONE, TWO), lambda a, b, ins: Fraction(d))
    assert tl.makespan == 3 * (m + p - 1) + 2 * (p - 1) * d


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1"]), st.integers(1, 6),
       st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_events_obey_the_semantics(name, p, k, v, seed):
    """Random costs: events follow each stage's list, tile [0, makespan], and every receive
    starts no earlier than its send ends plus the transfer time."""
    v = v if name == "interleaved" else 1
    prog = make_schedule(name, p, p * k, v)
    rnd = random.Random(seed)
    table = {(s, t): Fraction(rnd.randint(0, 9), rnd.randint(1, 4))
             for s in range(p) for t in ("fwd", "bwd", "bwd_input", "bwd_weight", "send",
                                         "recv", "sync", "step")}
    lat = {(a, b): Fraction(rnd.randint(0, 5), 2) for a in range(p) for b in range(p)}
    tl = simulate(prog, lambda s, ins: table[s, ins.kind], lambda a, b, ins: lat[a, b])
    arrival = {}  # (channel kind, src, dst, (mb, chunk)) -> when the data reaches dst
    for s in range(p):
        evs = tl.stage_events(s)
        real = [e for e in evs if e.kind != "idle"]
        assert [e.label for e in real] == [prog.label(i) for i in prog.stages[s]]
        assert evs[0].start == 0 and evs[-1].end == tl.makespan
        assert all(a.end == b.start for a, b in zip(evs, evs[1:]))
        assert all(e.end - e.start == table[s, e.kind] for e in real)
        compute = ("fwd", "bwd", "bwd_input", "bwd_weight")
        assert tl.busy[s] == sum(e.duration for e in real if e.kind in compute)
        for e, ins in zip(real, prog.stages[s]):
            if isinstance(ins, SENDS):
                kind, a, b, key = route(ins, s, p)
                arrival[kind, a, b, key] = e.end + lat[a, b]
    for s in range(p):
        real = [e for e in tl.stage_events(s) if e.kind != "idle"]
        for e, ins in zip(real, prog.stages[s]):
            if isinstance(ins, RECVS):
                assert e.start >= arrival[route(ins, s, p)]
    assert tl.peak_live == check_program(prog).peak_live
    total_idle = sum(tl.makespan - b for b in tl.busy)
    assert tl.bubble_fraction == total_idle / (p * tl.makespan)


def test_unit_cost_values():
    c = unit_cost(ONE, TWO, chunks=4)
    assert c(0, Fwd(0)) == Fraction(1, 4) and c(0, Bwd(0)) == Fraction(1, 2)
    assert c(1, BwdInput(0)) == c(1, BwdWeight(0)) == Fraction(1, 4)
    assert c(0, SendAct(0)) == c(0, RecvAct(0)) == c(0, SyncGrads()) == c(0, Step()) == 0


def test_waiting_shows_as_idle_before_the_receive():
    tl = simulate(gpipe(2, 1), unit_cost(ONE, TWO))
    s1 = tl.stage_events(1)
    assert (s1[0].kind, s1[0].start, s1[0].end) == ("idle", 0, 1)
    assert (s1[1].kind, s1[1].start) == ("recv", 1)


def test_deadlocked_program_cannot_be_simulated():
    prog = gpipe(2, 1)
    s0 = [RecvGrad(0), Fwd(0), SendAct(0), Bwd(0), SyncGrads(), Step()]
    with pytest.raises(DeadlockError, match="stage 0, instruction 0 .* stage 1, instruction 0"):
        simulate(dataclasses.replace(prog, stages=[s0, prog.stages[1]]), unit_cost())
