"""The ``secagg`` privacy mode between model arrays and masked integer vectors.

crypto.secagg_protocol holds the protocol; server/secagg.py and clients/secagg.py carry its
stages over Flower messages. One training round:

1. ``train.secagg_advertise``: each sampled client makes fresh X25519 keys and answers with
   the public halves, signed with its identity key, and its example count;
2. ``train.secagg_share``: each client gets every advertisement, checks them (signatures,
   identities enrolled in the node's policy), derives its neighbours from them and answers
   with Shamir shares of its secrets, sealed for each neighbour;
3. ``train``: the usual training request, plus the shares sealed for this client and the
   round's plan (``secagg`` record); the client trains and answers with its masked, fixed-point
   encoded model (``arrays["masked"]``, 2 bytes per parameter at secagg-bits=16);
4. ``train.secagg_consistency``: the clients that sent masked inputs sign the survivor set;
5. ``train.secagg_unmask``: given the signatures, the clients reveal the shares the server
   needs to remove the masks: the self-mask seeds of survivors, the pairwise keys of dropouts.

The server ends up with the sum of the survivors' encodings, mod ``2**bits``, which cannot
overflow: the encoding is the widest whose ``n``-term sum fits (crypto.fixedpoint). It decodes
the sum into the example-weighted average and gives it to the strategy as the only "reply":
every strategy whose aggregate is a weighted average works on top, server optimizers included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from crypto.fixedpoint import FixedPoint
from crypto.secagg import mask_dtype
from crypto.secagg_protocol import Advertisement
from fedlearn import families

ADVERTISE = "train.secagg_advertise"
SHARE = "train.secagg_share"
CONSISTENCY = "train.secagg_consistency"
UNMASK = "train.secagg_unmask"
# Message type of each stage that dropout-stage names.
STAGE_MESSAGE_TYPES = {"advertise": ADVERTISE, "share": SHARE, "train": "train", "consistency": CONSISTENCY, "unmask": UNMASK}
MASKED_ARRAY = "masked"  # the name of the masked vector in a training reply's ArrayRecord
SESSION_STATE = "secagg-session"  # a client's secrets between stages, in its node's private state


def round_context(round_id: str, server_round: int) -> bytes:
    """What every secret of a round is bound to (HKDF info, sealed shares' associated data)."""
    return f"fedlearn-secagg/{round_id}/{server_round}".encode()


@dataclass(frozen=True)
class RoundPlan:
    """What every client of one round must agree on (sent in the ``secagg`` record)."""

    round_id: str  # fresh per round: binds every derived secret to this round
    server_round: int
    threshold: int
    bits: int  # masked values live mod 2**bits
    value_bits: int  # fixed-point bits per value, so that the sum of max_terms fits in bits
    max_terms: int
    length: int
    weight_cap: int = 1  # the largest example count among the sampled clients
    exponents: tuple[int, ...] = ()  # per-tensor clipping ranges 2**e

    def context(self) -> bytes:
        return round_context(self.round_id, self.server_round)

    def encoding(self) -> FixedPoint:
        return FixedPoint(self.value_bits)

    def dtype(self) -> np.dtype:
        return mask_dtype(self.bits)

    def to_record(self) -> dict:
        return {"round-id": self.round_id, "server-round": self.server_round, "threshold": self.threshold,
                "bits": self.bits, "value-bits": self.value_bits, "max-terms": self.max_terms, "length": self.length,
                "weight-cap": self.weight_cap, "range-exp": list(self.exponents)}

    @classmethod
    def from_record(cls, record) -> RoundPlan:
        try:
            return cls(str(record["round-id"]), int(record["server-round"]), int(record["threshold"]), int(record["bits"]),
                       int(record["value-bits"]), int(record["max-terms"]), int(record["length"]),
                       int(record["weight-cap"]), tuple(int(e) for e in record["range-exp"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"malformed secagg plan ({exc})") from None


def advertisement_record(ad: Advertisement) -> dict:
    return {"c-public": ad.c_public, "s-public": ad.s_public, "identity": ad.identity, "ad-sig": ad.signature}


def advertisement_from_record(node: int, record: Mapping) -> Advertisement:
    try:
        return Advertisement(node, *(bytes(record[k]) for k in ("c-public", "s-public", "identity", "ad-sig")))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"malformed advertisement ({exc})") from None


def advertisements_record(ads: Mapping[int, Advertisement], partitions: Mapping[int, int]) -> dict:
    """Every advertisement of a round, as the share request carries them (lists by node), with the
    partition each advertiser reported: a simulated node's key is checked against its partition's."""
    nodes = sorted(ads)
    return {"ids": nodes, "c-publics": [ads[j].c_public for j in nodes], "s-publics": [ads[j].s_public for j in nodes],
            "identities": [ads[j].identity for j in nodes], "ad-sigs": [ads[j].signature for j in nodes],
            "partitions": [partitions.get(j, -1) for j in nodes]}


def advertised_partitions(record: Mapping) -> dict[int, int]:
    """The partitions the server says the advertisers reported (a hint: a wrong one only makes a
    simulated key fail its check; none at all for a record without them)."""
    try:
        return {int(j): int(p) for j, p in zip(record["ids"], record["partitions"], strict=True)}
    except (KeyError, TypeError, ValueError, OverflowError):
        return {}


def advertisements_from_record(record: Mapping) -> dict[int, Advertisement]:
    try:
        columns = [record[k] for k in ("ids", "c-publics", "s-publics", "identities", "ad-sigs")]
        ads = [Advertisement(int(j), bytes(c), bytes(s), bytes(i), bytes(g)) for j, c, s, i, g in zip(*columns, strict=True)]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"malformed advertisements ({exc})") from None
    if len({ad.node for ad in ads}) != len(ads):
        raise ValueError("the advertisements name one node twice")
    return {ad.node: ad for ad in ads}


def config_problems(config) -> list[str]:
    """privacy=secagg's own config checks (fedlearn.config runs the generic ones)."""
    problems = []
    if getattr(families.find(config.strategy), "aggregate", None) == families.PER_UPDATE:
        problems.append(
            f"strategy={config.strategy} cannot run with privacy=secagg: it needs each update in clear, "
            "but secure aggregation shows the server only the sum; use a sum strategy "
            "(fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad), or privacy=plain to give up secure aggregation"
        )
    if not 8 <= config.secagg_bits <= 32:
        problems.append(f"secagg-bits={config.secagg_bits}: must be between 8 and 32 (16 uploads 2 bytes per parameter)")
        return problems
    sampled = config.train_sample_size()
    if sampled < 2:
        return problems + [
            "privacy=secagg needs at least 2 clients per round (the sum of one client is its update): "
            "sample more clients, or set privacy=plain"
        ]
    try:
        value_bits = config.secagg_encoding(sampled).bits
    except ValueError:
        value_bits = 0
    if value_bits < 4:
        problems.append(
            f"secagg-bits={config.secagg_bits} leaves {value_bits} bits per value for a sum of {sampled} clients: "
            "raise secagg-bits, sample fewer clients per round, or set privacy=plain"
        )
    if config.secagg_neighbours < 0:
        problems.append(f"secagg-neighbours={config.secagg_neighbours}: must be >= 0 (0 = every other client)")
        return problems
    size = config.secagg_neighbourhood(sampled)
    if config.secagg_threshold and not 2 <= config.secagg_threshold <= size:
        problems.append(
            f"secagg-threshold={config.secagg_threshold}: must be between 2 and the {size} clients of a neighbourhood "
            f"({sampled} sampled per round" + (f", secagg-neighbours={config.secagg_neighbours})" if size < sampled else ")")
            + "; 0 picks a majority"
        )
    return problems
