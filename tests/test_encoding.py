"""fedlearn.encoding: model arrays as one vector, and their fixed-point ranges."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fedlearn.encoding import FixedPointCodec, flatten, range_exponents, unflatten

TEMPLATE = {"a.weight": np.zeros((3, 2), np.float32), "a.bias": np.zeros(3, np.float32), "b.weight": np.zeros((1, 3), np.float32)}


@given(st.permutations(list(TEMPLATE)), st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3))
def test_the_codec_ranges_follow_the_model_order_whatever_the_order_arrays_come_in(order, scales):
    """A checkpoint read back from safetensors lists its arrays in another order than the
    model: the ranges must still land on the tensors they were computed from."""
    arrays = {name: np.full(a.shape, s, np.float32) for (name, a), s in zip(TEMPLATE.items(), scales)}
    codec = FixedPointCodec(TEMPLATE)
    shuffled = {name: arrays[name] for name in order}
    assert codec.range_exponents(shuffled, 2.0) == range_exponents(arrays, 2.0)


def test_unflatten_inverts_flatten_and_keeps_dtypes():
    arrays = {name: np.arange(a.size, dtype=a.dtype).reshape(a.shape) for name, a in TEMPLATE.items()}
    back = unflatten(flatten(arrays), TEMPLATE)
    assert list(back) == list(TEMPLATE)
    for name in arrays:
        np.testing.assert_array_equal(back[name], arrays[name])
        assert back[name].dtype == np.float32
