"""fp16's fast conversions give exactly NumPy's bits: the detours themselves
(``float16_by_bits``, ``float32_by_table``) on every float16 pattern on the way up, on drawn
and edge float32 values on the way down, and on values worked out by hand where rounding is
delicate (ties to even, the boundary between subnormal and normal, signed zeros); and the
choosers ``to_float16``/``from_float16`` on arrays large enough to take either way."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.nn.precision import float16_by_bits, float32_by_table, from_float16, to_float16

TINY = 2.0 ** -14  # float16's smallest normal
STEP = 2.0 ** -24  # float16's subnormal spacing


def bits16(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).view(np.uint16)


@pytest.mark.parametrize("value, want", [
    (0.0, 0.0),
    (-0.0, -0.0),
    (STEP, STEP),
    (0.5 * STEP, 0.0),  # a tie: rounds to the even 0
    (0.75 * STEP, STEP),
    (1.5 * STEP, 2 * STEP),  # a tie: rounds to the even 2
    (2.5 * STEP, 2 * STEP),  # a tie: rounds to the even 2
    (-3.5 * STEP, -4 * STEP),
    (1023 * STEP, 1023 * STEP),  # the largest subnormal
    (1023.5 * STEP, TINY),  # a tie between it and the smallest normal: the even 1024 * STEP
    (float(np.nextafter(np.float32(TINY), np.float32(0))), TINY),
    (TINY, TINY),
    (65504.0, 65504.0),
])
def test_values_worked_out_by_hand(value, want):
    got = float16_by_bits(np.array([value], dtype=np.float32))
    assert got.dtype == np.float16
    assert bits16(got)[0] == bits16(np.float16(want)), (value, got[0], want)


def test_every_tie_and_step_below_the_normal_range():
    k = np.arange(0, 1025, dtype=np.float64)
    x = np.concatenate([k * STEP, (k + 0.5) * STEP, (k + 0.25) * STEP]).astype(np.float32)
    x = np.concatenate([x, -x]).reshape(6, -1)
    got = float16_by_bits(x)
    assert got.shape == x.shape and (got.view(np.uint16) == x.astype(np.float16).view(
        np.uint16)).all()


def test_specials_keep_their_meaning():
    x = np.array([np.inf, -np.inf, np.nan, 1e9, -1e9], dtype=np.float32)
    with np.errstate(over="ignore"):
        got = float16_by_bits(np.concatenate([x, [1e-6]]).astype(np.float32))
    assert np.isposinf(got[0]) and np.isneginf(got[1]) and np.isnan(got[2])
    assert np.isposinf(got[3]) and np.isneginf(got[4])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2 ** 32 - 1), min_size=1, max_size=64),
       st.integers(-30, 5))
def test_drawn_float32_round_as_numpy_does(patterns, exponent):
    """Any float32 bit pattern, and the same values scaled into fp16's subnormal range."""
    raw = np.array(patterns, dtype=np.uint32).view(np.float32)
    scaled = (np.random.default_rng(len(patterns)).normal(size=len(patterns))
              * 2.0 ** exponent).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for x in (raw, scaled):
            want, got = x.astype(np.float16), float16_by_bits(x)
            same = (got.view(np.uint16) == want.view(np.uint16)) | (np.isnan(got) & np.isnan(want))
            assert same.all(), (x[~same], got[~same], want[~same])


def test_every_float16_widens_as_numpy_does():
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    want, got = halves.astype(np.float32), float32_by_table(halves.reshape(256, 256)).reshape(-1)
    nan = np.isnan(want)
    assert got.dtype == np.float32 and np.isnan(got[nan]).all()
    assert (got[~nan].view(np.uint32) == want[~nan].view(np.uint32)).all()
    assert float32_by_table(np.array([2 ** -24], np.float16))[0] == np.float32(2.0 ** -24)


@pytest.mark.parametrize("share", [0.0, 0.01, 0.3, 1.0])
def test_the_choosers_give_numpys_bits_either_way(share):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 1000)).astype(np.float32)
    x[rng.random(x.shape) < share] *= np.float32(1e-6)  # into float16's subnormal range
    assert (to_float16(x).view(np.uint16) == x.astype(np.float16).view(np.uint16)).all()
    h = x.astype(np.float16)
    assert (from_float16(h).view(np.uint32) == h.astype(np.float32).view(np.uint32)).all()
    assert to_float16(x).shape == x.shape and from_float16(h).shape == x.shape
