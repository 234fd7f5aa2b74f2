"""The ``he-threshold`` privacy mode between model arrays and threshold BFV ciphertexts
(crypto.threshold does the cryptography; server/threshold.py and clients/threshold.py carry it
over Flower messages).

Key ceremony, once at the start of a run (query messages, each reply signed by a node the
access policy lets act as ``keyholder``):

1. ``query.threshold_join``: every connected node is asked; keyholders answer with a fresh
   X25519 public key, and the first ``threshold-committee`` of them by partition id form the
   committee (member 0, 1, ...);
2. ``query.threshold_keygen``, to each member in turn: it makes its key share extending the
   previous member's public key, seals the share for the committee and Shamir-splits the sealing
   key ``threshold-quorum``-of-n, one share sealed for each other member (X25519 + AES-GCM);
   the last member's public key is the joint one;
3. ``query.threshold_hold``: each member gets the shares sealed for it and keeps them.

The server keeps the sealed key shares (which it cannot open) and audits the digests of the
context, the joint key and the committee (``key_ceremony``).

Each training round: clients encrypt ``(num-examples / weight-cap) * model`` in fixed point
(crypto.fixedpoint, the widest encoding whose sum over the sampled clients fits 29 bits) under
the joint key; the server adds the ciphertexts and sends the sum to the committee
(``query.threshold_decrypt``); each member answers with its partial decryption. For members
that did not answer, the others reveal their Shamir shares of the missing members' sealing keys
(``query.threshold_reveal``), and the server opens those key shares and decrypts in their place.
The fused sum decodes to the example-weighted average, which the wrapped strategy gets as its
only reply: the global model is in clear on the server, as under secagg.
"""

from __future__ import annotations

from dataclasses import dataclass

from crypto.digest import sha256_hex
from crypto.fixedpoint import FixedPoint
from fedlearn import families

JOIN = "query.threshold_join"
KEYGEN = "query.threshold_keygen"
HOLD = "query.threshold_hold"
DECRYPT = "query.threshold_decrypt"
REVEAL = "query.threshold_reveal"
MESSAGE_TYPES = (JOIN, KEYGEN, HOLD, DECRYPT, REVEAL)
RECORD = "threshold"  # a request's or reply's threshold fields
MEMBER_STATE = "threshold-member"  # a key holder's CommitteeMember, in its node's private state


@dataclass(frozen=True)
class Committee:
    """What the key ceremony made: public facts only."""

    ceremony: str
    context: bytes
    joint_public: bytes
    nodes: tuple[int, ...]  # Flower node id of member 0, 1, ...
    partitions: tuple[int, ...]  # their partition ids (stable across runs, unlike node ids; their
    # names and key fingerprints are in the audit log's records of the ceremony's signed replies)
    quorum: int
    sealed_shares: tuple[bytes, ...]  # member i's key share, sealed (the server cannot open it)

    def facts(self) -> dict:
        """What the audit log records about it."""
        return {"ceremony": self.ceremony, "scheme": "bfv", "context_digest": sha256_hex(self.context),
                "joint_public_key_digest": sha256_hex(self.joint_public), "committee": len(self.nodes),
                "quorum": self.quorum, "members": [{"member": i, "node_id": n, "partition": p}
                                                   for i, (n, p) in enumerate(zip(self.nodes, self.partitions))]}


@dataclass(frozen=True)
class RoundPlan:
    """What every contribution of one training round must agree on (sent in the request)."""

    value_bits: int  # fixed-point bits per value, so that the sum of max_terms fits SUM_BITS
    max_terms: int
    weight_cap: int  # the largest example count among the sampled clients
    exponents: tuple[int, ...]  # per-tensor clipping ranges 2**e

    def encoding(self) -> FixedPoint:
        return FixedPoint(self.value_bits)

    def to_record(self) -> dict:
        return {"value-bits": self.value_bits, "max-terms": self.max_terms, "weight-cap": self.weight_cap,
                "range-exp": list(self.exponents)}

    @classmethod
    def from_record(cls, record) -> RoundPlan:
        try:
            return cls(int(record["value-bits"]), int(record["max-terms"]), int(record["weight-cap"]),
                       tuple(int(e) for e in record["range-exp"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"malformed he-threshold plan ({exc})") from None


def config_problems(config) -> list[str]:
    """privacy=he-threshold's own config checks (fedlearn.config runs the generic ones)."""
    problems = []
    if getattr(families.find(config.strategy), "aggregate", None) == families.PER_UPDATE:
        problems.append(
            f"strategy={config.strategy} cannot run with privacy=he-threshold: it needs each update in clear, but "
            "only the sum is ever decrypted; use a sum strategy (fedavg, fedavgm, fedprox, fedadam, fedyogi, "
            "fedadagrad), or privacy=plain"
        )
    committee, quorum = config.threshold_committee, config.threshold_quorum_size()
    if not 2 <= committee <= config.num_clients:
        problems.append(
            f"threshold-committee={committee}: must be between 2 and num-clients={config.num_clients} (the key "
            "holders are nodes of the federation)"
        )
    elif not 2 <= quorum <= committee:
        problems.append(
            f"threshold-quorum={config.threshold_quorum}: must be between 2 and threshold-committee={committee} "
            "(1 would let one member decrypt alone), or 0 for a majority"
        )
    if config.train_sample_size() < 2:
        problems.append(
            "privacy=he-threshold needs at least 2 clients per round (the sum of one client is its update): "
            "sample more clients, or set privacy=plain"
        )
    if config.threshold_range < 0:
        problems.append(f"threshold-range={config.threshold_range}: must be > 0 (a multiple of each tensor's largest value), or 0 for auto")
    if config.threshold_timeout <= 0:
        problems.append(f"threshold-timeout={config.threshold_timeout}: must be > 0 seconds")
    return problems
