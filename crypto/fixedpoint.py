"""Fixed-point encoding of real-valued, weighted updates so that integers can be summed.

Used wherever a sum runs over integers (BFV homomorphic encryption, and masked secure
aggregation): each client maps ``weight * x`` to an unsigned integer, the integers are
summed, and the sum maps back to the weighted sum of the clients' values.

Encoding (per value, ``Q = 2**(bits-1) - 1``, range ``r > 0``, weight ``0 < w <= 1``)::

    u = round(clip(x, -r, r) * w * Q / r) + Q          in [0, 2Q]

A sum of ``n`` encodings lies in ``[0, 2Qn]``, so it needs ``bit_length(2Qn)`` bits: the
"headroom" of ``ceil(log2 n)`` bits above ``bits`` comes from the number of terms, and a sum
of at most ``n`` terms cannot overflow by construction. Decoding subtracts ``nQ`` and scales
by ``r / Q``. Error bound of the decoded weighted sum, per value, for values inside the
range: ``n * r / (2Q)`` (each term rounds by at most half a step); values outside are clipped.

``Packing`` puts several such sums side by side in one integer slot ("lanes"), so one
ciphertext slot carries several parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FixedPoint:
    bits: int  # bits per value per client, before headroom

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 30:
            raise ValueError(f"fixed-point bits={self.bits}: must be between 2 and 30")

    @classmethod
    def widest(cls, total_bits: int, terms: int) -> FixedPoint:
        """The most precise encoding whose sum of ``terms`` values fits in ``total_bits`` (masked
        sums live modulo ``2**total_bits``: the headroom comes out of the value bits)."""
        bits = 2
        while bits < 30 and cls(bits + 1).sum_bits(terms) <= total_bits:
            bits += 1
        if cls(bits).sum_bits(terms) > total_bits:
            raise ValueError(f"a sum of {terms} values does not fit in {total_bits} bits, even at 2 bits per value")
        return cls(bits)

    @property
    def q(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def encode(self, values: np.ndarray, weight: float, ranges: np.ndarray | float) -> tuple[np.ndarray, int]:
        """``weight * values`` as integers in [0, 2Q], and how many values were clipped."""
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight={weight}: must be in (0, 1] (divide example counts by the round's cap)")
        ranges = np.asarray(ranges, dtype=np.float64)
        if not (np.isfinite(ranges).all() and (ranges > 0).all()):
            raise ValueError("fixed-point ranges must be finite and > 0")
        x = np.asarray(values, dtype=np.float64)
        if not np.isfinite(x).all():
            raise ValueError("cannot encode NaN or Inf")
        clipped = int(np.count_nonzero(np.abs(x) > ranges))
        scaled = np.clip(x, -ranges, ranges) * (weight * self.q / ranges)
        return (np.rint(scaled).astype(np.int64) + self.q).astype(np.uint64), clipped

    def decode(self, sums: np.ndarray, terms: int, ranges: np.ndarray | float) -> np.ndarray:
        """The weighted sum of ``terms`` encodings (not divided by the total weight)."""
        signed = np.asarray(sums, dtype=np.uint64).astype(np.int64) - terms * self.q
        return signed.astype(np.float64) * (np.asarray(ranges, dtype=np.float64) / self.q)

    def error_bound(self, terms: int, ranges: np.ndarray | float) -> np.ndarray | float:
        """Largest error of a decoded weighted sum of ``terms`` values within their range."""
        return terms * np.asarray(ranges, dtype=np.float64) / (2 * self.q)

    def sum_bits(self, terms: int) -> int:
        """Bits a sum of ``terms`` encodings needs (value bits plus headroom)."""
        return (2 * self.q * terms).bit_length()


@dataclass(frozen=True)
class Packing:
    """``lanes`` sums of ``lane_bits`` each in one unsigned integer slot (lane k at bit k*lane_bits)."""

    lane_bits: int
    lanes: int

    @classmethod
    def for_sum(cls, encoding: FixedPoint, terms: int, slot_bits: int) -> Packing:
        """As many lanes as fit in ``slot_bits`` for a sum of up to ``terms`` encodings."""
        if terms < 1:
            raise ValueError(f"terms={terms}: a sum needs at least one term")
        lane_bits = encoding.sum_bits(terms)
        lanes = slot_bits // lane_bits
        if lanes < 1:
            raise ValueError(
                f"a sum of {terms} {encoding.bits}-bit values needs {lane_bits} bits, but a slot holds "
                f"{slot_bits}: use fewer bits or fewer clients per round"
            )
        return cls(lane_bits, min(lanes, 63 // lane_bits))

    def slots_for(self, count: int) -> int:
        return -(-count // self.lanes)

    def pack(self, lanes_values: np.ndarray, slots: int) -> np.ndarray:
        """Pack values (each < 2**lane_bits) into ``slots`` int64 slots (zero padded)."""
        padded = np.zeros(slots * self.lanes, dtype=np.uint64)
        padded[: len(lanes_values)] = lanes_values
        rows = padded.reshape(self.lanes, slots)
        packed = np.zeros(slots, dtype=np.uint64)
        for lane in range(self.lanes):
            packed |= rows[lane] << np.uint64(lane * self.lane_bits)
        return packed.astype(np.int64)

    def unpack(self, packed: np.ndarray, count: int) -> np.ndarray:
        """The first ``count`` lane values of ``packed`` slots."""
        packed = np.asarray(packed).astype(np.uint64)
        mask = np.uint64((1 << self.lane_bits) - 1)
        rows = [(packed >> np.uint64(lane * self.lane_bits)) & mask for lane in range(self.lanes)]
        return np.concatenate(rows)[:count]
