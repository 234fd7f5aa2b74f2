"""fedlearn.updates: what an update in clear must be before a strategy reads it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from fedlearn.updates import Rejected, check_plain_update

MODEL = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.zeros(3, np.float32))})


def npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def update(w_data: bytes, b: np.ndarray | None = None) -> RecordDict:
    w = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=w_data)
    return RecordDict({"arrays": ArrayRecord({"w": w, "b": Array(np.ones(3, np.float32) if b is None else b)})})


def test_an_honest_update_passes():
    check_plain_update(update(npy(np.ones((2, 3), np.float32))), MODEL)


@pytest.mark.parametrize("bytes_of, says", [
    (lambda: npy(np.ones((2, 3), ">f4")), "its bytes hold >f4[2, 3], it declares <f4[2, 3]"),
    (lambda: npy(np.ones((3, 2), np.float32)), "its bytes hold <f4[3, 2]"),
    (lambda: npy(np.ones((2, 3), np.float64)), "its bytes hold <f8[2, 3]"),
    (lambda: npy(np.asfortranarray(np.ones((2, 3), np.float32))), "in Fortran order"),
    (lambda: npy(np.ones((2, 3), np.float32)) + b"\0" * 4, "bytes of values for 6 values"),
    (lambda: b"\x93NUMPY" + bytes(40), "not a .npy array"),
])
def test_the_bytes_must_hold_what_the_array_declares(bytes_of, says):
    """Issue 22: each case passed the check before. ``Array.numpy()`` reads the .npy header;
    the check read the declared float32, so big-endian bytes passed as finite and aggregated as
    garbage (1.0 as >f4 read as <f4 is 4.6e-41)."""
    with pytest.raises(Rejected, match=f"malformed update: .*{says[:20]}".replace("[", r"\[")):
        check_plain_update(update(bytes_of()), MODEL)


@given(st.binary(max_size=300), st.integers(0, 200))
def test_any_bytes_are_either_the_declared_array_or_rejected(data, cut):
    """A parser of untrusted input: arbitrary bytes, and a real array's bytes cut short or
    padded, end as a Rejected or as exactly the declared, finite array."""
    for blob in (data, npy(np.ones((2, 3), np.float32))[:cut] + data[:cut % 7]):
        try:
            check_plain_update(update(blob), MODEL)
        except Rejected:
            continue
        array = update(blob)["arrays"]["w"].numpy()
        assert array.dtype == np.float32 and array.shape == (2, 3) and np.isfinite(array).all()
