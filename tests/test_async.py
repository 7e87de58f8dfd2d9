"""Asynchronous training in the thread world: parameter server, bounded staleness, local SGD.

Async runs are non-deterministic by nature; each property below is one that holds whatever the
arrival order (s = 0 equals synchronous SGD; a replay equals its serial reference bit for bit;
local SGD with H = 1 equals synchronous SGD; the staleness bound holds), checked against the
closed-form least-squares replica of ``async_cases``.
"""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import async_cases as C
from minipar.dist.comm import CommError, run_threads

LR = 0.1


@settings(max_examples=8, deadline=None)
@given(workers=st.integers(1, 3), servers=st.integers(1, 2), steps=st.integers(1, 4))
def test_staleness_zero_is_synchronous_sgd(workers, servers, steps):
    out = run_threads(lambda c: C.ps_case(c, steps, LR, servers, 0), servers + workers)
    expected = C.sync_sgd(workers, steps, LR)
    for final, _ in out:  # every rank holds the same final weights
        numpy.testing.assert_allclose(final, expected, rtol=1e-12, atol=1e-14)


def test_replay_of_a_hand_written_order_equals_the_hand_computed_stale_update():
    out = run_threads(lambda c: C.ps_case(c, 1, LR, 1, None, order=C.HAND_ORDER), 3)
    numpy.testing.assert_array_equal(out[0][0], C.hand_replay(LR))
    assert out[0][1].staleness == [0, 1]  # the second push was computed one update ago


@settings(max_examples=8, deadline=None)
@given(workers=st.integers(2, 3), servers=st.integers(1, 2), steps=st.integers(1, 3),
       bound=st.sampled_from([None, 0, 1]), staleness_lr=st.booleans())
def test_a_recorded_run_replays_to_its_serial_reference_bit_for_bit(workers, servers, steps,
                                                                    bound, staleness_lr):
    free = run_threads(lambda c: C.ps_case(c, steps, LR, servers, bound,
                                           staleness_lr=staleness_lr), servers + workers)
    order = free[0][1].order  # server 0's record of what it handled, in sequence
    reference = C.reference_of(order, workers, LR, staleness_lr)
    if servers == 1:  # one server: the free run itself is what its record replays to
        numpy.testing.assert_array_equal(free[0][0], reference)
    again = run_threads(lambda c: C.ps_case(c, steps, LR, servers, bound, order=order,
                                            staleness_lr=staleness_lr), servers + workers)
    for final, _ in again:
        numpy.testing.assert_array_equal(final, reference)


@settings(max_examples=6, deadline=None)
@given(workers=st.integers(2, 3), steps=st.integers(2, 5), bound=st.integers(0, 2))
def test_every_read_lies_in_the_staleness_window(workers, steps, bound):
    """A read of step c sees every update of the steps before c - s and none of step c + s or
    later: W (c - s) <= version <= W (c + s) for W workers (one server, so versions count
    every update)."""
    out = run_threads(lambda c: C.ps_case(c, steps, LR, 1, bound), 1 + workers)
    for _, result in out[1:]:
        for c, version in enumerate(result.versions):
            assert workers * max(0, c - bound) <= version <= workers * (c + bound)


@settings(max_examples=6, deadline=None)
@given(workers=st.integers(1, 3), steps=st.integers(1, 5), sync_every=st.integers(1, 3))
def test_local_sgd_equals_its_written_out_reference(workers, steps, sync_every):
    out = run_threads(lambda c: C.local_sgd_case(c, steps, LR, sync_every), workers)
    expected = C.local_sgd_reference(workers, steps, LR, sync_every)
    for final in out:
        numpy.testing.assert_allclose(final, expected, rtol=1e-12, atol=1e-14)


def test_local_sgd_every_step_is_synchronous_sgd():
    out = run_threads(lambda c: C.local_sgd_case(c, 4, LR, 1), 3)
    numpy.testing.assert_allclose(out[0], C.sync_sgd(3, 4, LR), rtol=1e-12, atol=1e-14)


def test_a_replay_that_disagrees_with_the_workers_is_refused():
    with pytest.raises(CommError, match="replay order"):
        run_threads(lambda c: C.ps_case(c, 1, LR, 1, None, order=[("push", 0), ("pull", 0),
                                                                   ("pull", 1), ("push", 1)]), 3)


def test_every_rank_a_server_is_refused():
    with pytest.raises(CommError, match="--servers 2"):
        run_threads(lambda c: C.ps_case(c, 1, LR, 2, None), 2)


def test_sync_sgd_equals_its_written_out_reference():
    out = run_threads(lambda c: C.sync_case(c, 4, LR), 3)
    for final in out:
        numpy.testing.assert_allclose(final, C.sync_sgd(3, 4, LR), rtol=1e-12, atol=1e-14)


def test_adamw_on_the_server_replays_bit_for_bit():
    free = run_threads(lambda c: C.ps_case(c, 3, LR, 2, 1, optimizer="adamw"), 4)
    order = free[0][1].order
    again = run_threads(lambda c: C.ps_case(c, 3, LR, 2, 1, order=order, optimizer="adamw"), 4)
    reference = C.reference_of(order, 2, LR, optimizer="adamw")
    for final, _ in again:
        numpy.testing.assert_array_equal(final, reference)
