"""Model arrays as one vector of values, and the per-tensor clipping ranges that the
fixed-point encoding (crypto.fixedpoint) of every privacy mode uses.

Ranges are powers of two, ``2**e`` with ``e = ceil(log2(factor * max|global tensor|))``: every
client derives the same ones from the same global model, the exponents travel in clear (the
server learns each tensor's order of magnitude, nothing else), and the range grows with the
model instead of being a fixed constant (Flower's SecAgg+ clips every value to +-8).
"""

from __future__ import annotations

import math

import numpy as np

RANGE_FLOOR = 1e-3  # a tensor of zeros still gets a usable range


def flatten(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])


def unflatten(vector: np.ndarray, template: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name, array in template.items():
        size = int(np.prod(array.shape))
        out[name] = vector[start : start + size].reshape(array.shape).astype(array.dtype)
        start += size
    return out


def range_exponents(arrays: dict[str, np.ndarray], factor: float) -> list[int]:
    """Per-tensor power-of-two clipping ranges (exponents) for a fixed-point encoding."""
    return [
        math.ceil(math.log2(factor * max(float(np.abs(a).max(initial=0.0)), RANGE_FLOOR)))
        for a in arrays.values()
    ]


def expand_ranges(exponents: list[int], template: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.full(int(np.prod(a.shape)), 2.0**e) for e, a in zip(exponents, template.values())])
