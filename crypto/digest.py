"""Canonical bytes and SHA-256 digests: what gets signed, chained and compared.

Two parties that hash "the same thing" must hash the same bytes, whatever library wrote the
object. Canonical JSON is sorted keys, no whitespace, UTF-8, no NaN; named arrays are hashed
by name order with their dtype and shape, so a model saved as safetensors and the same weights
received in a Flower message give the same digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

ZERO_DIGEST = "0" * 64  # the "previous record" of the first record in a hash chain


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8; refuses NaN/Infinity (not JSON, not comparable)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over named arrays: for each name in sorted order, a JSON header
    ``[name, dtype, shape]`` and a newline, then the little-endian C-order bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        array = np.ascontiguousarray(array, dtype=little)
        h.update(canonical_json([name, array.dtype.str, list(array.shape)]) + b"\n")
        h.update(array.tobytes(order="C"))
    return h.hexdigest()
