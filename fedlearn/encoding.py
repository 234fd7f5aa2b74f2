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


MAX_RANGE_EXPONENT = 126  # ranges are 2**e with |e| at most this: any float32 value fits, and 2.0**e never overflows


def expand_ranges(exponents: list[int], template: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.full(int(np.prod(a.shape)), 2.0**e) for e, a in zip(exponents, template.values())])


class FixedPointCodec:
    """One model architecture's arrays <-> fixed-point integer vectors, and back from their sum,
    under a round's plan (secagg's or he-threshold's: its ``encoding()`` and ``exponents``)."""

    def __init__(self, template: dict[str, np.ndarray]):
        self.template = template
        self.length = sum(int(np.prod(a.shape)) for a in template.values())

    def range_exponents(self, arrays: dict[str, np.ndarray], factor: float) -> list[int]:
        """The ranges of ``arrays`` in this codec's order. A mapping's own order is not to be
        trusted: a model read back from a checkpoint lists its arrays in another order, and
        ranges given in that order land on the wrong tensors."""
        return range_exponents({name: arrays[name] for name in self.template}, factor)

    def ranges(self, plan) -> np.ndarray:
        return expand_ranges(list(plan.exponents), self.template)

    def encode(self, arrays: dict[str, np.ndarray], weight: float, plan) -> tuple[np.ndarray, int]:
        """``weight * arrays`` as integers in [0, 2Q], and how many values were clipped."""
        if list(arrays) != list(self.template):
            raise ValueError("the arrays are not this model's")
        return plan.encoding().encode(flatten(arrays), weight, self.ranges(plan))

    def decode(self, total: np.ndarray, terms: int, total_weight: float, plan) -> dict[str, np.ndarray]:
        """The weighted average behind the sum of ``terms`` encodings of total weight ``total_weight``."""
        weighted = plan.encoding().decode(total, terms, self.ranges(plan))
        return unflatten(weighted / total_weight, self.template)

    def error_bound(self, terms: int, total_weight: float, plan) -> float:
        """Largest error of a decoded average value (values within their range)."""
        return float(np.max(plan.encoding().error_bound(terms, self.ranges(plan)))) / total_weight
