"""Stragglers: the delay is reproducible and exactly as asked; the cost formulas hold by hand."""

from __future__ import annotations

import pytest

from minipar.parallel.stragglers import make_delay, parse_straggler
from minipar.sim import stragglers as S


def test_parse_straggler_names_the_flag_on_bad_input():
    assert parse_straggler("1:3", 4) == (1, 3.0)
    for bad in ("1", "x:2", "4:2", "-1:2", "1:0.5"):
        with pytest.raises(ValueError, match="--straggler"):
            parse_straggler(bad, 4)


def test_a_straggler_sleeps_factor_minus_one_times_its_compute():
    assert make_delay(0, (1, 3.0)) is None  # not the slow rank
    assert make_delay(1, (1, 3.0))(0.5) == pytest.approx(1.0)


def test_jitter_is_reproducible_per_seed_and_rank():
    a = [make_delay(2, None, jitter=0.5, seed=3)(1.0) for _ in range(1)]
    b = [make_delay(2, None, jitter=0.5, seed=3)(1.0) for _ in range(1)]
    c = [make_delay(1, None, jitter=0.5, seed=3)(1.0) for _ in range(1)]
    assert a == b and a != c and all(x >= 0 for x in a + c)


def test_the_mode_formulas_by_hand():
    compute = [1.0, 1.0, 3.0]  # one straggler at 3x
    assert S.sync_step_s(compute, 0.5) == 3.5
    assert S.local_sgd_step_s(compute, 0.5, sync_every=5) == pytest.approx(3.1)
    assert S.ps_updates_per_s(compute, 0.5) == pytest.approx(2 / 1.5 + 1 / 3.5)
    assert S.ps_updates_per_s(compute, 0.5, apply_s=1.0) == 1.0  # the server caps it
    assert S.ssp_updates_per_s(compute, 0.5) == pytest.approx(3 / 3.5)
