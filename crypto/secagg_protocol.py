"""The SecAgg protocol's client and server logic (Bonawitz et al. 2017, with the neighbour graph
of Bell et al. 2020 as an option), as plain data in and out: no Flower, no network. The Flower
stages in server/ and clients/ only carry these messages.

Stages, for clients identified by small integers:

1. advertise: each client sends two X25519 public keys: ``c`` (to seal shares for it) and ``s``
   (for its pairwise masks), signed with its identity key (Ed25519, enrolled by the operator).
2. share: each client gets every advertisement, checks every signature, derives the neighbour
   graph from a seed the advertised keys fix (so the server cannot pick a client's neighbours),
   and sends each neighbour, sealed with their ``c`` agreement key, a Shamir share of its
   128-bit self-mask secret ``b`` and of the 128-bit secret its ``s`` key derives from.
3. mask: each client sends ``u + PRG(b) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij) mod 2^bits``
   over the neighbours that completed stage 2.
4. consistency: each client that sent a masked input signs the survivor set the server names,
   once per round (Bonawitz et al. 2017, the active-adversary variant).
5. unmask: a client that holds a quorum of signatures (the threshold, and more than half of the
   advertisers) over the set it signed reveals, for each neighbour in that set, its share of the neighbour's ``b``; for each
   outside it, its share of their ``s`` key. Never both for the same client, and the signatures
   keep a server from telling two groups of clients two different sets to collect both.

With at least ``threshold`` shares per client the server recovers what it needs; with fewer it
raises, and the round fails loudly.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from crypto import secagg, signing
from crypto.digest import canonical_json

SEALED_SHARES_BYTES = secagg.sealed_size(2 * secagg.SHARE_BYTES)  # a share of b and one of s, sealed for one holder
IDENTITY_BYTES, SIGNATURE_BYTES = 32, 64  # Ed25519
ADVERTISE_PURPOSE, SURVIVORS_PURPOSE = "fedlearn-secagg-advertise-v1", "fedlearn-secagg-survivors-v1"


@dataclass(frozen=True)
class Advertisement:
    """A client's round keys, signed with its identity key (raw Ed25519 public key)."""

    node: int
    c_public: bytes
    s_public: bytes
    identity: bytes
    signature: bytes

    def statement(self, context: bytes) -> bytes:
        return canonical_json({"purpose": ADVERTISE_PURPOSE, "context": context.hex(), "node": self.node,
                               "c": self.c_public.hex(), "s": self.s_public.hex()})

    def problem(self, context: bytes) -> str | None:
        """Why this advertisement cannot be used (None: it can): bad keys or a bad signature."""
        if not all(secagg.is_usable_public(k) for k in (self.c_public, self.s_public)):
            return f"node {self.node} advertised keys that are not usable X25519 public keys"
        if not signed_by(self.identity, self.signature, self.statement(context)):
            return f"node {self.node}'s advertisement is not signed by the identity it names"
        return None


def signed_by(identity: bytes, signature: bytes, statement: bytes) -> bool:
    """``signature`` is the Ed25519 signature of ``statement`` by the raw public key ``identity``."""
    if len(identity) != IDENTITY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(identity)
    except ValueError:
        return False
    return signing.verify(key, signature, statement)


def quorum(threshold: int, advertisers: int) -> int:
    """Signatures over one survivor set that a client needs before it reveals anything: the
    threshold, and more than half of the round's advertisers, so that two different sets can
    never both gather a quorum of clients that sign once per round (whatever the graph)."""
    return max(threshold, advertisers // 2 + 1)


def survivors_statement(context: bytes, survivors: Iterable[int]) -> bytes:
    return canonical_json({"purpose": SURVIVORS_PURPOSE, "context": context.hex(), "survivors": sorted(survivors)})


def graph_seed(context: bytes, publics: Mapping[int, tuple[bytes, bytes]]) -> bytes:
    """The seed of a round's neighbour graph: a hash of every advertised key, which the clients
    chose fresh after the server fixed the round, so the server cannot try seeds until one
    suits it (it can only leave advertisements out, each one a client it loses)."""
    keys = [[j, c.hex(), s.hex()] for j, (c, s) in sorted(publics.items())]
    return hashlib.sha256(canonical_json({"context": context.hex(), "keys": keys})).digest()


def round_graph(context: bytes, publics: Mapping[int, tuple[bytes, bytes]], neighbours: int) -> dict[int, list[int]]:
    """The neighbour graph of a round, as every client and the server derive it (Bell et al. 2020)."""
    return neighbourhoods(publics, neighbours, random.Random(graph_seed(context, publics)))


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
    identities: dict[int, bytes] = field(default_factory=dict)  # every advertiser -> its identity key, checked at share
    holders: list[int] = field(default_factory=list)  # neighbours who completed stage 2
    survivors: list[int] = field(default_factory=list)  # the survivor set this client signed (all of it)

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
            "s-publics": [self.publics[j][1] for j in ids], "advertisers": sorted(self.identities),
            "identities": [self.identities[j] for j in sorted(self.identities)],
            "holders": list(self.holders), "survivors": list(self.survivors),
        }

    @classmethod
    def from_state(cls, state: Mapping) -> ClientSession:
        ids = [int(j) for j in state["ids"]]
        publics = {j: (bytes(c), bytes(s)) for j, c, s in zip(ids, state["c-publics"], state["s-publics"])}
        return cls(
            int(state["me"]), int(state["threshold"]), int(state["bits"]), int(state["length"]), bytes(state["context"]),
            X25519PrivateKey.from_private_bytes(bytes(state["c-key"])),
            bytes(state["s-secret"]), bytes(state["b-secret"]), publics,
            {int(j): bytes(i) for j, i in zip(state["advertisers"], state["identities"])},
            [int(j) for j in state["holders"]], [int(j) for j in state["survivors"]],
        )

    def advertise(self, identity: Ed25519PrivateKey) -> Advertisement:
        """This round's public keys, signed with the client's identity key."""
        c_public, s_public = secagg.public_bytes(self.c_key), secagg.public_bytes(self.s_key)
        unsigned = Advertisement(self.me, c_public, s_public, signing.public_raw(identity.public_key()), b"")
        return Advertisement(self.me, c_public, s_public, unsigned.identity, identity.sign(unsigned.statement(self.context)))

    def share(self, advertisements: Mapping[int, Advertisement], neighbours: int) -> dict[int, bytes]:
        """Sealed shares of (b, s private key) for every neighbour (and one kept for itself), the
        neighbours being this client's place in the graph the advertisements fix. Refuses a set
        with a bad signature, one identity twice, or its own keys changed: a server could
        otherwise stand in for peers, or for this client."""
        mine = advertisements.get(self.me)
        if mine is None or (mine.c_public, mine.s_public) != (secagg.public_bytes(self.c_key), secagg.public_bytes(self.s_key)):
            raise ValueError("this client's own advertisement is missing or altered: refusing to share")
        problems = [p for p in (ad.problem(self.context) for ad in advertisements.values()) if p]
        if problems:
            raise ValueError(f"{problems[0]} ({len(problems)} of {len(advertisements)} advertisements): refusing to share")
        identities = [ad.identity for ad in advertisements.values()]
        if len(set(identities)) != len(identities):
            raise ValueError("one identity key advertises for two clients: refusing to share")
        graph = round_graph(self.context, {j: (ad.c_public, ad.s_public) for j, ad in advertisements.items()}, neighbours)
        members = graph[self.me]
        if len(members) < self.threshold:
            raise ValueError(f"{len(members)} clients in this client's neighbourhood, the threshold is {self.threshold}")
        self.publics = {j: (advertisements[j].c_public, advertisements[j].s_public) for j in members}
        self.identities = {j: ad.identity for j, ad in advertisements.items()}
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

    @property
    def quorum(self) -> int:
        return quorum(self.threshold, len(self.identities))

    def sign_survivors(self, survivors: Iterable[int], identity: Ed25519PrivateKey) -> bytes:
        """The consistency check's signature over the survivor set, given once per round: the
        set must hold this client, at least ``threshold`` of its holders and a quorum."""
        if self.survivors:
            raise ValueError("asked to sign a second survivor set in one round: refusing")
        if not self.holders:
            raise ValueError("this client sent no masked input in this round: no survivor set to sign")
        survivors = sorted(set(survivors))
        if not set(survivors) <= set(self.identities) or len(survivors) < self.quorum:
            raise ValueError(f"a survivor set of {len(survivors)} clients that did not all advertise, or fewer than the "
                             f"quorum {self.quorum}: refusing to sign")
        mine = set(survivors) & set(self.holders)
        if self.me not in mine or len(mine) < self.threshold:
            raise ValueError(f"the survivor set holds {len(mine)} of this client's holders (itself "
                             f"{'included' if self.me in mine else 'not included'}), the threshold is {self.threshold}: refusing to sign")
        self.survivors = survivors
        return identity.sign(survivors_statement(self.context, survivors))

    def unmask(self, sealed_for_me: Mapping[int, bytes], signatures: Mapping[int, bytes]) -> dict[int, tuple[str, bytes]]:
        """Reveal, per holder: its ``b`` share if it is in the survivor set this client signed, its
        ``s`` share if not; only with a quorum of signatures over that same set."""
        if not self.survivors:
            raise ValueError("this client signed no survivor set in this round: refusing to unmask")
        statement = survivors_statement(self.context, self.survivors)
        signers = [j for j in self.survivors if j in signatures and signed_by(self.identities[j], signatures[j], statement)]
        if len(signers) < self.quorum:
            raise ValueError(f"{len(signers)} valid signatures over the survivor set this client signed, fewer than the "
                             f"quorum {self.quorum}: the server may be naming different survivors to different "
                             "clients; refusing to unmask")
        survivors = set(self.survivors)
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
