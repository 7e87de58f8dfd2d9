"""Schedules as data: structure, chunk maps, flag validation, and program checks that catch bugs."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.config import SCHEDULE_NAMES, ConfigError
from minipar.parallel.program_checks import DeadlockError, ProgramError, check_program
from minipar.parallel.schedules import (
    RECVS, SCHEDULES, SENDS, Bwd, BwdInput, BwdWeight, Fwd, Program, RecvAct, RecvGrad, SendAct,
    SendGrad, Step, SyncGrads, act_dest, chunk_location, global_chunk, grad_dest, gpipe,
    interleaved, make_schedule, naive, one_f_one_b, peer, zero_bubble_h1,
)


@st.composite
def layouts(draw, schedule=None):
    """(schedule, p, m, v) over p in 1..16, m in 1..64 (m a multiple of p when interleaved)."""
    name = draw(st.sampled_from(SCHEDULE_NAMES)) if schedule is None else schedule
    p = draw(st.integers(1, 16))
    if name == "interleaved":
        return name, p, p * draw(st.integers(1, 64 // p)), draw(st.integers(1, 4))
    return name, p, draw(st.integers(1, 64)), 1


# ------------------------------------------------------------------------------- structure
@settings(max_examples=60, deadline=None)
@given(layouts())
def test_every_schedule_passes_the_checks(layout):
    name, p, m, v = layout
    prog = make_schedule(name, p, m, v)
    report = check_program(prog)
    assert (prog.n_stages, prog.n_microbatches, prog.n_chunks) == (p, m, v)
    for s, lst in enumerate(prog.stages):
        assert lst[-2:] == [SyncGrads(), Step()]
        for i, ins in enumerate(lst):
            # Sends right after the pass that computes them, receives right before their use.
            if isinstance(ins, SendAct):
                assert lst[i - 1] == Fwd(ins.mb, ins.chunk)
            if isinstance(ins, RecvAct):
                assert lst[i + 1] == Fwd(ins.mb, ins.chunk)
            if isinstance(ins, SendGrad):
                assert type(lst[i - 1]) in (Bwd, BwdInput) and lst[i - 1].mb == ins.mb
            if isinstance(ins, RecvGrad):
                assert type(lst[i + 1]) in (Bwd, BwdInput) and lst[i + 1].mb == ins.mb
    # Two messages (activation, gradient) per microbatch per boundary between global chunks.
    assert report.n_messages == 2 * m * (p * v - 1) * (p > 1)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SCHEDULE_NAMES), st.integers(1, 64), st.integers(1, 4))
def test_one_stage_has_no_messages(name, m, v):
    prog = make_schedule(name, 1, m, v if name == "interleaved" else 1)
    check_program(prog)
    assert not any(isinstance(i, SENDS + RECVS) for i in prog.stages[0])


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.integers(1, 64))
def test_peak_live_gpipe_and_1f1b(p, m):
    assert check_program(gpipe(p, m)).peak_live == [m] * p
    assert check_program(one_f_one_b(p, m)).peak_live == [min(m, p - s) for s in range(p)]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.integers(1, 64))
def test_zb_h1_keeps_the_peak_memory_of_1f1b(p, m):
    """B frees what 1F1B frees; waiting W's never push a stage past 1F1B's first stage."""
    zb, ref = check_program(zero_bubble_h1(p, m)), check_program(one_f_one_b(p, m))
    assert zb.peak_full == ref.peak_live
    assert max(zb.peak_live) == max(ref.peak_live) == min(m, p)


@settings(max_examples=50, deadline=None)
@given(layouts("interleaved"))
def test_interleaved_first_stage_memory(layout):
    """Stage 0 holds p(1 + (p-1)/(pv)) microbatches = v*p + p - 1 chunk-microbatches
    (Korthikanti et al. 2022, section 4.2.3), or all of them when there are fewer."""
    _, p, m, v = layout
    report = check_program(interleaved(p, m, v))
    assert report.peak_live[0] == min(m * v, v * p + p - 1)
    assert max(report.peak_live) == report.peak_live[0]


def test_naive_runs_one_microbatch_at_a_time():
    prog = naive(3, 2)
    check_program(prog)
    assert [prog.label(i) for i in prog.compute(0)] == ["F0", "B0", "F1", "B1"]


# ------------------------------------------------------------------------------ chunk maps
@settings(max_examples=100, deadline=None)
@given(st.integers(1, 16), st.integers(0, 200))
def test_chunk_maps_are_inverse(p, g):
    s, j = chunk_location(g, p)
    assert 0 <= s < p and global_chunk(s, j, p) == g
    nxt = act_dest(s, j, p)
    assert global_chunk(*nxt, p) == g + 1
    assert grad_dest(*nxt, p) == (s, j)
    assert grad_dest(0, 0, p) is None


@pytest.mark.parametrize("p,v", [(2, 2), (4, 3)])
def test_last_stage_hands_to_first_stage_next_chunk(p, v):
    for j in range(v - 1):
        assert act_dest(p - 1, j, p, v) == (0, j + 1)
    assert act_dest(p - 1, v - 1, p, v) is None


@pytest.mark.parametrize("p,m,v", [(2, 2, 1), (4, 4, 2), (3, 6, 3)])
def test_peer_names_both_ends(p, m, v):
    """A send's peer holds the matching receive, and that receive's peer is the sender."""
    prog = interleaved(p, m, v)
    for s, lst in enumerate(prog.stages):
        for ins in lst:
            if isinstance(ins, SENDS):
                d = peer(s, ins, p)
                g = global_chunk(s, ins.chunk, p) + (1 if isinstance(ins, SendAct) else -1)
                assert chunk_location(g, p)[0] == d != s
                recv = (RecvAct if isinstance(ins, SendAct) else RecvGrad)(
                    ins.mb, chunk_location(g, p)[1])
                assert recv in prog.stages[d] and peer(d, recv, p) == s


def test_labels():
    assert Fwd(3).label == "F3" and Bwd(3).label == "B3" and BwdWeight(3).label == "W3"
    assert SendAct(3).label == "sA3" and RecvGrad(2).label == "rG2"
    assert Fwd(3, 1).label == "F3.1" and Fwd(3).label_for(2) == "F3.0"
    assert interleaved(2, 2, 2).label(Fwd(1)) == "F1.0"
    assert SyncGrads().label == "sync" and Step().label == "step"


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("args,flag", [
    (("pipedream", 2, 4, 1), "--schedule"),
    (("1f1b", 2, 0, 1), "--microbatches"),
    (("1f1b", 0, 4, 1), "--pp"),
    (("interleaved", 2, 4, 0), "--virtual-stages"),
    (("gpipe", 2, 4, 2), "--virtual-stages"),
    (("interleaved", 4, 6, 2), "--microbatches"),
])
def test_make_schedule_names_the_flag(args, flag):
    with pytest.raises(ValueError) as err:
        make_schedule(*args)
    assert isinstance(err.value, ConfigError)
    assert flag in str(err.value) and "\n" not in str(err.value)


def test_interleaved_needs_a_multiple_of_p():
    with pytest.raises(ValueError, match="multiple"):
        interleaved(4, 6, 2)


def test_registry_matches_config():
    assert tuple(SCHEDULES) == SCHEDULE_NAMES


# ------------------------------------------------------------------- checks fail on bad input
def _edit(prog: Program, stage: int, new: list) -> Program:
    stages = [list(x) for x in prog.stages]
    stages[stage] = new
    return dataclasses.replace(prog, stages=stages)


def test_dropped_recv_is_caught():
    prog = one_f_one_b(3, 4)
    lst = list(prog.stages[1])
    lst.remove(RecvAct(2))
    with pytest.raises(ProgramError, match=r"stage 1, instruction \d+ \(F2\)"):
        check_program(_edit(prog, 1, lst))


def test_dropped_send_is_caught():
    prog = gpipe(2, 3)
    lst = list(prog.stages[1])
    lst.remove(SendGrad(1))
    with pytest.raises(ProgramError, match="receive has no send"):
        check_program(_edit(prog, 1, lst))


def test_swapped_sends_are_caught():
    prog = gpipe(2, 3)
    lst = list(prog.stages[0])
    a, b = lst.index(SendAct(0)), lst.index(SendAct(1))
    lst[a], lst[b] = lst[b], lst[a]  # F0 sA1 F1 sA0: sA1 now precedes F1
    lst.remove(SendAct(1))
    lst.insert(lst.index(Fwd(1)) + 1, SendAct(1))  # F0 F1 sA1 sA0: valid sends, wrong order
    assert lst.index(SendAct(1)) < lst.index(SendAct(0))
    with pytest.raises(ProgramError, match="k-th act receive"):
        check_program(_edit(prog, 0, lst))


def test_backward_before_forward_is_caught():
    prog = one_f_one_b(1, 3)
    lst = list(prog.stages[0])
    i, j = lst.index(Fwd(1)), lst.index(Bwd(1))
    lst[i], lst[j] = lst[j], lst[i]
    with pytest.raises(ProgramError, match="backward before its forward"):
        check_program(_edit(prog, 0, lst))


def test_weight_before_input_grad_is_caught():
    prog = zero_bubble_h1(1, 2)
    lst = list(prog.stages[0])
    i, j = lst.index(BwdInput(0)), lst.index(BwdWeight(0))
    lst[i], lst[j] = lst[j], lst[i]
    with pytest.raises(ProgramError, match="before its BwdInput"):
        check_program(_edit(prog, 0, lst))


def test_missing_and_duplicate_passes_are_caught():
    prog = gpipe(1, 2)
    with pytest.raises(ProgramError, match="never runs the backward of microbatch 1"):
        check_program(_edit(prog, 0, [x for x in prog.stages[0] if x != Bwd(1)]))
    with pytest.raises(ProgramError, match="second time"):
        check_program(_edit(prog, 0, [Fwd(0)] + prog.stages[0]))
    with pytest.raises(ProgramError, match="SyncGrads"):
        check_program(_edit(prog, 0, prog.stages[0][:-1]))


def test_local_handoff_order_is_checked_with_one_stage():
    prog = interleaved(1, 1, 2)  # F0.0 F0.1 B0.1 B0.0
    lst = list(prog.stages[0])
    i, j = lst.index(Fwd(0, 0)), lst.index(Fwd(0, 1))
    lst[i], lst[j] = lst[j], lst[i]
    with pytest.raises(ProgramError, match="input activation"):
        check_program(_edit(prog, 0, lst))
    with pytest.raises(ProgramError, match="no sends"):
        check_program(_edit(prog, 0, [Fwd(0, 0), SendAct(0, 0)] + prog.stages[0][1:]))


def test_cycle_deadlocks():
    """Stage 0 waits for B0's gradient before F1; stage 1 waits for F1 before B0."""
    prog = gpipe(2, 2)
    s0 = [Fwd(0), SendAct(0), RecvGrad(0), Bwd(0), Fwd(1), SendAct(1), RecvGrad(1), Bwd(1),
          SyncGrads(), Step()]
    s1 = [RecvAct(0), Fwd(0), RecvAct(1), Fwd(1), Bwd(0), SendGrad(0), Bwd(1), SendGrad(1),
          SyncGrads(), Step()]
    bad = dataclasses.replace(prog, stages=[s0, s1])
    with pytest.raises(DeadlockError) as err:
        check_program(bad)
    msg = str(err.value)
    assert "stage 0, instruction 2 (rG0) waits for stage 1" in msg
    assert "stage 1, instruction 2 (rA1) waits for stage 0" in msg


def test_tied_weights_are_refused_across_chunks_even_on_one_stage():
    """With --virtual-stages 2 on one pipeline rank the embedding and the head sit in different
    chunks; tying them there used to build an untied head silently."""
    from minipar.config import ModelConfig, ParallelConfig

    cfg = ModelConfig(tie_weights=True)
    par = ParallelConfig(schedule="interleaved", virtual_stages=2)
    with pytest.raises(ConfigError, match="--virtual-stages"):
        par.validate(cfg)
    ParallelConfig(schedule="interleaved").validate(cfg)  # one chunk: tying is fine
