"""The SecAgg protocol's client and server logic (Bonawitz et al. 2017, with the neighbour graph
of Bell et al. 2020 as an option), as plain data in and out: no Flower, no network. The Flower
stages in server/ and clients/ only carry these messages.

Stages, for clients identified by small integers:

1. advertise: each client sends two X25519 public keys: ``c`` (to seal shares for it) and ``s``
   (for its pairwise masks).
2. share: each client sends every neighbour, sealed with their ``c`` agreement key, a Shamir
   share of its 128-bit self-mask secret ``b`` and of the 128-bit secret its ``s`` key derives from.
3. mask: each client sends ``u + PRG(b) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij) mod 2^bits``
   over the neighbours that completed stage 2.
4. unmask: for each neighbour that sent a masked input, a client reveals its share of that
   neighbour's ``b``; for each that dropped after stage 2, its share of their ``s`` key. Never
   both for the same client, so the server can remove masks but never see a single input.

With at least ``threshold`` shares per client the server recovers what it needs; with fewer it
raises, and the round fails loudly.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from crypto import secagg

SEALED_SHARES_BYTES = secagg.sealed_size(2 * secagg.SHARE_BYTES)  # a share of b and one of s, sealed for one holder


def _pair_context(context: bytes, purpose: bytes) -> bytes:
    return context + b"/" + purpose


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _mask_sign(me: int, other: int) -> int:
    return 1 if me < other else -1


@dataclass
class ClientSession:
    """One client's side of one round. ``context`` binds every secret to the run and round."""

    me: int
    threshold: int
    bits: int
    length: int
    context: bytes
    c_key: X25519PrivateKey = field(default_factory=secagg.generate_key)
    s_secret: bytes = field(default_factory=secagg.new_secret)  # the s key derives from it
    b_secret: bytes = field(default_factory=secagg.new_secret)  # the self mask derives from it
    publics: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # neighbour -> (c, s)
    holders: list[int] = field(default_factory=list)  # neighbours who completed stage 2

    @property
    def s_key(self) -> X25519PrivateKey:
        return secagg.mask_private_key(self.s_secret, self.context)

    def to_state(self) -> dict:
        """Everything the session holds, as bytes, ints and lists of them: a client keeps it
        between stages in its node's private state (never sent anywhere)."""
        ids = sorted(self.publics)
        return {
            "me": self.me, "threshold": self.threshold, "bits": self.bits, "length": self.length,
            "context": self.context, "c-key": _private_bytes(self.c_key), "s-secret": self.s_secret,
            "b-secret": self.b_secret, "ids": ids, "c-publics": [self.publics[j][0] for j in ids],
            "s-publics": [self.publics[j][1] for j in ids], "holders": list(self.holders),
        }

    @classmethod
    def from_state(cls, state: Mapping) -> ClientSession:
        publics = {int(j): (bytes(c), bytes(s)) for j, c, s in zip(state["ids"], state["c-publics"], state["s-publics"])}
        return cls(
            int(state["me"]), int(state["threshold"]), int(state["bits"]), int(state["length"]), bytes(state["context"]),
            X25519PrivateKey.from_private_bytes(bytes(state["c-key"])),
            bytes(state["s-secret"]), bytes(state["b-secret"]), publics, [int(j) for j in state["holders"]],
        )

    def advertise(self) -> tuple[bytes, bytes]:
        return secagg.public_bytes(self.c_key), secagg.public_bytes(self.s_key)

    def share(self, publics: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Sealed shares of (b, s private key) for every neighbour (and one kept for itself)."""
        self.publics = dict(publics)
        members = sorted(self.publics)
        if self.me not in members:
            raise ValueError("this client is not among the advertised neighbours")
        if len(members) < self.threshold:
            raise ValueError(f"{len(members)} clients advertised keys, the threshold is {self.threshold}")
        b_shares = secagg.split_secret(self.b_secret, self.threshold, len(members))
        s_shares = secagg.split_secret(self.s_secret, self.threshold, len(members))
        sealed = {}
        for j, b_share, s_share in zip(members, b_shares, s_shares):
            key = secagg.agree(self.c_key, self.publics[j][0], _pair_context(self.context, b"seal"))
            sealed[j] = secagg.seal(key, b_share + s_share, self._associated(self.me, j))
        return sealed

    def _associated(self, sender: int, receiver: int) -> bytes:
        return self.context + f"/share/{sender}->{receiver}".encode()

    def mask(self, encoded: np.ndarray, holders: Iterable[int]) -> np.ndarray:
        """The masked input, over the neighbours that completed stage 2 (``holders``), as
        ``secagg.mask_dtype(bits)``: uniformly distributed whatever the input."""
        if self.holders:  # a second masked input of the same round would let the two be subtracted
            raise ValueError("asked to mask a second input in one round: refusing")
        holders = sorted(set(holders))
        if len(encoded) != self.length:
            raise ValueError(f"input has {len(encoded)} values, the round expects {self.length}")
        if self.me not in holders or not set(holders) <= set(self.publics):
            raise ValueError("the holders must be neighbours of this client, itself included")
        if len(holders) < self.threshold:  # fewer holders than t: the server alone would hold enough shares
            raise ValueError(f"the server named {len(holders)} holders, fewer than the threshold {self.threshold}: "
                             "refusing to mask")
        self.holders = holders
        y = secagg.reduce(encoded, self.bits) + secagg.expand(secagg.self_mask_key(self.b_secret, self.context), self.length, self.bits)
        s_key = self.s_key
        for j in self.holders:
            if j == self.me:
                continue
            seed = secagg.agree(s_key, self.publics[j][1], _pair_context(self.context, b"mask"))
            mask = secagg.expand(seed, self.length, self.bits)
            if _mask_sign(self.me, j) > 0:
                y += mask
            else:
                y -= mask
        return secagg.reduce(y, self.bits)

    def unmask(self, sealed_for_me: Mapping[int, bytes], survivors: Iterable[int]) -> dict[int, tuple[str, bytes]]:
        """Reveal, per holder: its ``b`` share if it survived stage 3, its ``s`` share if not."""
        survivors = set(survivors)
        if len(survivors) < self.threshold:
            raise ValueError(f"only {len(survivors)} clients sent masked inputs, fewer than the threshold {self.threshold}")
        if self.me not in survivors or not survivors <= set(self.holders):
            # survivors outside this client's holders, or without itself: not the round it masked in
            raise ValueError("the survivors named are not among this client's holders (itself included): refusing to unmask")
        revealed = {}
        for j in self.holders:
            key = secagg.agree(self.c_key, self.publics[j][0], _pair_context(self.context, b"seal"))
            shares = secagg.open_sealed(key, sealed_for_me[j], self._associated(j, self.me))
            cut = secagg.SHARE_BYTES
            revealed[j] = ("b", shares[:cut]) if j in survivors else ("s", shares[cut:])
        return revealed


def unmask_sum(
    masked: Mapping[int, np.ndarray],
    revealed: Iterable[Mapping[int, tuple[str, bytes]]],
    s_publics: Mapping[int, bytes],
    holders: Mapping[int, Iterable[int]],
    threshold: int,
    bits: int,
    context: bytes,
) -> np.ndarray:
    """The server's last step: the sum of the survivors' inputs mod 2**bits, or ValueError when
    fewer than ``threshold`` clients revealed shares for someone. ``holders[i]`` are the
    neighbours survivor ``i`` masked with (what the server told it in stage 3)."""
    length = len(next(iter(masked.values())))
    survivors = sorted(masked)
    shares: dict[tuple[int, str], list[bytes]] = {}
    for answer in revealed:
        for j, (kind, share) in answer.items():
            expected = "b" if j in masked else "s"
            if kind != expected:
                raise ValueError(f"a client revealed the {kind} share of client {j}, which must stay secret")
            shares.setdefault((j, kind), []).append(share)
    total = np.zeros(length, dtype=secagg.mask_dtype(bits))
    for y in masked.values():
        total += secagg.reduce(y, bits)
    for i in survivors:  # remove self masks
        b_secret = secagg.combine_secret(shares.get((i, "b"), []), threshold)
        total -= secagg.expand(secagg.self_mask_key(b_secret, context), length, bits)
    dropped = sorted({d for i in survivors for d in holders[i] if d not in masked})
    for d in dropped:  # remove the pairwise masks survivors shared with dropped clients
        s_private = secagg.mask_private_key(secagg.combine_secret(shares.get((d, "s"), []), threshold), context)
        for i in survivors:
            if d not in holders[i]:
                continue
            seed = secagg.agree(s_private, s_publics[i], _pair_context(context, b"mask"))
            mask = secagg.expand(seed, length, bits)
            # Survivor i added sign(i, d) * mask; take it back out.
            if _mask_sign(i, d) > 0:
                total -= mask
            else:
                total += mask
    return secagg.reduce(total, bits)


def neighbourhoods(members: Iterable[int], neighbours: int, rng: random.Random | None = None) -> dict[int, list[int]]:
    """Who shares and masks with whom (each list includes the member itself). ``neighbours=0``
    or at least ``len(members) - 1``: the complete graph (SecAgg). Otherwise SecAgg+'s sparse
    graph (Bell et al. 2020): members in a random order on a ring, each linked to the
    ``ceil(neighbours / 2)`` next and previous ones, so cost grows with ``neighbours``, not n."""
    members = sorted(members)
    n = len(members)
    if neighbours < 0:
        raise ValueError(f"neighbours={neighbours}: must be >= 0 (0 = everyone)")
    if neighbours == 0 or neighbours >= n - 1:
        return {m: list(members) for m in members}
    order = list(members)
    (rng or random.SystemRandom()).shuffle(order)
    half = -(-neighbours // 2)
    graph = {m: {m} for m in members}
    for position, m in enumerate(order):
        for step in range(1, half + 1):
            other = order[(position + step) % n]
            graph[m].add(other)
            graph[other].add(m)
    return {m: sorted(links) for m, links in graph.items()}
