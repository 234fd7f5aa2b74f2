"""Fixed-point encoding and lane packing: sums decode within the stated bound, never overflow."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.fixedpoint import FixedPoint, Packing


@settings(max_examples=150, deadline=None)
@given(
    bits=st.integers(2, 24),
    terms=st.integers(1, 300),
    length=st.integers(1, 200),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**32 - 1),
)
def test_decoded_weighted_sum_is_within_the_bound(bits, terms, length, scale, seed):
    rng = np.random.default_rng(seed)
    encoding = FixedPoint(bits)
    ranges = scale * rng.uniform(0.5, 2.0, length)
    values = [rng.uniform(-1.5, 1.5, length) * ranges for _ in range(terms)]  # some outside: clipped
    weights = rng.uniform(1e-3, 1.0, terms)
    total = np.zeros(length, dtype=np.uint64)
    for x, w in zip(values, weights):
        encoded, _ = encoding.encode(x, float(w), ranges)
        assert encoded.max() <= 2 * encoding.q
        total += encoded
    assert int(total.max()).bit_length() <= encoding.sum_bits(terms)  # headroom holds by construction
    expected = sum(w * np.clip(x, -ranges, ranges) for x, w in zip(values, weights))
    error = np.abs(encoding.decode(total, terms, ranges) - expected)
    assert (error <= encoding.error_bound(terms, ranges) * (1 + 1e-9)).all()


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(2, 24), terms=st.integers(1, 5000), slot_bits=st.integers(20, 62), count=st.integers(1, 3000))
def test_packed_lanes_survive_the_worst_case_sum(bits, terms, slot_bits, count):
    encoding = FixedPoint(bits)
    if encoding.sum_bits(terms) > slot_bits:
        with pytest.raises(ValueError, match="fewer"):
            Packing.for_sum(encoding, terms, slot_bits)
        return
    packing = Packing.for_sum(encoding, terms, slot_bits)
    assert packing.lanes * packing.lane_bits <= slot_bits
    worst = np.full(count, 2 * encoding.q * terms, dtype=np.uint64)  # every term at its maximum
    packed = packing.pack(worst, packing.slots_for(count))
    assert (packed >= 0).all() and int(packed.max()).bit_length() <= slot_bits
    assert (packing.unpack(packed, count) == worst).all()


def test_sum_of_packed_encodings_is_the_packed_sum():
    encoding = FixedPoint(16)
    packing = Packing.for_sum(encoding, 10, 50)
    rng = np.random.default_rng(0)
    parts = [encoding.encode(rng.normal(size=1000), 1.0, 4.0)[0] for _ in range(10)]
    slots = packing.slots_for(1000)
    packed_sum = sum(packing.pack(p, slots) for p in parts)
    assert (packing.unpack(packed_sum, 1000) == sum(parts)).all()


def test_clipping_is_counted():
    _, clipped = FixedPoint(8).encode(np.array([0.5, 3.0, -7.0]), 1.0, 1.0)
    assert clipped == 2


@pytest.mark.parametrize("weight", [0.0, -0.5, 1.5, float("nan")])
def test_weights_outside_unit_interval_are_refused(weight):
    with pytest.raises(ValueError, match="weight"):
        FixedPoint(8).encode(np.zeros(3), weight, 1.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="bits"):
        FixedPoint(1)
    with pytest.raises(ValueError, match="NaN"):
        FixedPoint(8).encode(np.array([np.nan]), 1.0, 1.0)
    with pytest.raises(ValueError, match="ranges"):
        FixedPoint(8).encode(np.zeros(2), 1.0, 0.0)
