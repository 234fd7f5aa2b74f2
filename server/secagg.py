"""``SecAggStrategy``: gives a sum strategy the unmasked sum instead of plaintext replies
(privacy=secagg).

It wraps any Flower strategy whose aggregate is an example-weighted average (FedAvg, FedProx,
FedAvgM, FedAdam, FedYogi, FedAdagrad): the wrapped strategy samples and configures the
round; this class runs the key stages around its training request, adds the masked inputs,
removes the masks with the revealed shares, and hands the wrapped strategy one reply holding
the decoded average, so the strategy's own server step (momentum, Adam, ...) runs unchanged.

A round that loses so many clients that fewer than the threshold are left at any stage
raises RoundFailed: the run stops and says why, it never goes on with an unchanged model.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import TypeVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from crypto import secagg
from crypto.secagg_protocol import (
    SEALED_SHARES_BYTES,
    Advertisement,
    quorum,
    round_graph,
    signed_by,
    survivors_statement,
    unmask_sum,
)
from fedlearn.config import RunConfig
from fedlearn.encoding import FixedPointCodec
from fedlearn.errors import RoundFailed
from fedlearn.messages import (
    AUTH_RECORD,
    NODE_RECORD,
    NUM_EXAMPLES_KEY,
    PARTITION_KEY,
    SECAGG_RECORD,
)
from fedlearn.secagg import (
    ADVERTISE,
    CONSISTENCY,
    MASKED_ARRAY,
    SHARE,
    UNMASK,
    RoundPlan,
    advertisement_from_record,
    advertisements_record,
)
from fedlearn.updates import array_values
from server.grid import parsed_replies, short_reason
from server.privacy import HidingStrategy

T = TypeVar("T")


def average_as_reply(average: dict[str, np.ndarray], replies: list[Message], examples: int) -> Message:
    """What a wrapped strategy sees of a round whose updates only the privacy mode saw: one
    reply holding the average, weighted by all ``examples``, and the replies' metrics already
    averaged (they travel in clear, as in every mode)."""
    metrics = aggregate_metricrecords([r.content for r in replies], NUM_EXAMPLES_KEY)
    metrics[NUM_EXAMPLES_KEY] = examples
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in average.items()}),
        "metrics": MetricRecord(dict(metrics)),
    })
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def advertised_by_signer(ad: Advertisement, content: RecordDict) -> str | None:
    """Why ``ad`` does not name the identity that signed its reply for access control (None: it
    does), so that no node can advertise round keys under another's identity."""
    if AUTH_RECORD not in content:
        return None  # no access control on this grid (strategy tests): the clients' own checks remain
    if str(content[AUTH_RECORD].get("key", "")) != base64.b64encode(ad.identity).decode():
        return "its advertisement names another identity than the key that signed the reply"
    return None


class SecAggStrategy(HidingStrategy):
    def __init__(self, inner: Strategy, config: RunConfig, template: dict[str, np.ndarray]):
        super().__init__(inner, config, template)
        self.codec = FixedPointCodec(template)
        self.plan: RoundPlan | None = None
        self.grid: Grid | None = None
        self.graph: dict[int, list[int]] = {}  # node -> its neighbourhood (itself included)
        self.ads: dict[int, Advertisement] = {}  # node -> its signed advertisement
        self.publics: dict[int, tuple[bytes, bytes]] = {}  # node -> (c, s) public keys
        self.counts: dict[int, int] = {}  # node -> training examples it reported this round
        self.holders: dict[int, list[int]] = {}  # node -> neighbours it was told to mask with
        self.dropped: dict[str, list[int]] = {}  # stage -> nodes lost there this round

    def summary(self) -> None:
        log(INFO, "\t├── privacy: secagg (%d-bit masked sums), the server sees only the sum", self.config.secagg_bits)
        self.inner.summary()

    # -- stages before training ----------------------------------------------------------
    def _exchange(self, server_round: int, stage: str, message_type: str, records: dict[int, dict],
                  config: ConfigRecord, parse: Callable[[int, ConfigRecord, RecordDict], T]) -> dict[int, T]:
        """Send one stage's requests; ``parse(node, secagg record, content)`` of each reply that came
        back without error, by node. A reply it refuses (ValueError, KeyError) counts as a dropout,
        so one broken node cannot sink the round. Fewer than the threshold left: the round fails."""
        messages = [
            Message(RecordDict({"config": config, SECAGG_RECORD: ConfigRecord({"round-id": self.plan.round_id, **record})}),
                    dst_node_id=node, message_type=message_type)
            for node, record in records.items()
        ]
        answered = parsed_replies(self.grid, messages, self.config.secagg_timeout, SECAGG_RECORD, parse,
                                  f"secagg: round {server_round}, {stage} stage")
        self.dropped[stage] = sorted(set(records) - set(answered))
        self._require(len(answered), stage, server_round)
        return answered

    def _require(self, survivors: int, stage: str, server_round: int, errors: list[str] = (), needed: int = 0) -> None:
        needed = needed or self.plan.threshold
        if survivors < needed:
            lost = sum(len(v) for v in self.dropped.values())
            first = short_reason(errors[0]) if errors else ""
            raise RoundFailed(
                f"round {server_round}: secure aggregation lost {lost} of {self.plan.max_terms} clients by the {stage} stage "
                f"(dropped per stage: {self._dropped_counts()}" + (f"; first client error: {first}" if first else "")
                + f"); {survivors} are left, fewer than the "
                + (f"threshold {needed} needed to remove the masks." if needed == self.plan.threshold else
                   f"quorum {needed} (more than half of the {len(self.ads)} that advertised) that must sign one survivor "
                   "set before any share is revealed.")
                + " The run stopped rather than continue with an "
                "unchanged model: start more nodes, or lower secagg-threshold (the privacy margin) if dropouts are expected"
            )

    def _dropped_counts(self) -> dict[str, int]:
        return {stage: len(nodes) for stage, nodes in self.dropped.items()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        self.grid, self.dropped = grid, {}
        sampled = [m.metadata.dst_node_id for m in messages]
        n = len(sampled)
        encoding = self.config.secagg_encoding(n)
        exponents = self.codec.range_exponents(
            {k: v.numpy() for k, v in arrays.items()}, self.config.secagg_range_factor(encoding.bits)
        )
        self.plan = RoundPlan(
            round_id=secrets.token_hex(16), server_round=server_round, threshold=self.config.secagg_threshold_for(n),
            bits=self.config.secagg_bits, value_bits=encoding.bits, max_terms=n, length=self.codec.length,
            exponents=tuple(exponents),
        )
        stage_config = ConfigRecord({**self.config.to_flat(), "server-round": server_round})
        basics = {k: v for k, v in self.plan.to_record().items() if k in ("threshold", "bits", "length", "server-round")}

        def advertisement_and_count(node, record, content):
            ad = advertisement_from_record(node, record)
            count = int(content[NODE_RECORD][NUM_EXAMPLES_KEY])
            # A low-order key would make every peer's agreement with it fail: the sender, not the round, drops.
            problem = ad.problem(self.plan.context()) or advertised_by_signer(ad, content)
            if problem or count < 1:
                raise ValueError(problem or f"example count {count}: must be positive")
            return ad, count, content[NODE_RECORD].get(PARTITION_KEY, -1)

        advertised = self._exchange(server_round, "advertise", ADVERTISE, {node: basics for node in sampled}, stage_config,
                                    advertisement_and_count)
        self.ads = {node: ad for node, (ad, _, _) in advertised.items()}
        self.publics = {node: (ad.c_public, ad.s_public) for node, ad in self.ads.items()}
        self.counts = {node: count for node, (_, count, _) in advertised.items()}
        partitions = {node: partition for node, (_, _, partition) in advertised.items()}
        self.graph = round_graph(self.plan.context(), self.publics, self.config.secagg_neighbours)

        every_advertisement = advertisements_record(self.ads, partitions)  # each client derives its own neighbours from them all

        def sealed_shares(node, record, content):
            ids, sealed = [int(j) for j in record["ids"]], [bytes(s) for s in record["sealed"]]
            if ids != self.graph[node] or len(sealed) != len(ids):
                raise ValueError(f"shares for {ids}, not for its neighbours {self.graph[node]}")
            if any(len(blob) != SEALED_SHARES_BYTES for blob in sealed):  # relayed only if it can be opened
                raise ValueError(f"sealed shares are {SEALED_SHARES_BYTES} bytes, got {sorted({len(b) for b in sealed})}")
            return dict(zip(ids, sealed))

        shared = self._exchange(server_round, "share", SHARE, {node: every_advertisement for node in self.ads}, stage_config,
                                sealed_shares)
        inbox: dict[int, dict[int, bytes]] = {node: {} for node in shared}  # receiver -> sender -> sealed shares
        for sender, sealed in shared.items():
            for receiver, blob in sealed.items():
                if receiver in inbox:
                    inbox[receiver][sender] = blob

        self.plan = dataclasses.replace(self.plan, weight_cap=max(self.counts[n] for n in shared))
        self.holders = {node: sorted(inbox[node]) for node in shared}
        train = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in shared:
                continue  # dropped during the key stages: nothing to train for
            # holders: the neighbours whose shares this node holds (sealed, in that order), the
            # same it masks with and reveals shares of.
            record = {**self.plan.to_record(), "holders": self.holders[node], "sealed": [inbox[node][j] for j in self.holders[node]]}
            content = RecordDict({**dict(message.content), SECAGG_RECORD: ConfigRecord(record)})
            train.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return train

    # -- replies ------------------------------------------------------------------------
    def _parse(self, content: RecordDict) -> tuple[np.ndarray, float, int, int]:
        """(masked vector, weight, examples, clipped) of a masked training reply, checked."""
        if self.plan is None:
            raise ValueError("no secure-aggregation round is open")
        if SECAGG_RECORD not in content or "arrays" not in content or MASKED_ARRAY not in content["arrays"]:
            raise ValueError("not a masked update (no secagg record or no masked array): is the node in privacy=secagg?")
        try:
            record, array = content[SECAGG_RECORD], content["arrays"][MASKED_ARRAY]
            weight, clipped = float(record["weight"]), int(record["clipped"])
            examples = int(content["metrics"][NUM_EXAMPLES_KEY])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"malformed masked update ({exc})") from None
        if list(content["arrays"]) != [MASKED_ARRAY]:
            raise ValueError(f"a masked update holds only '{MASKED_ARRAY}', got {sorted(content['arrays'])}")
        if array.dtype != str(self.plan.dtype()) or list(array.shape) != [self.plan.length]:
            raise ValueError(f"masked vector is {array.dtype}{list(array.shape)}, the round expects {self.plan.dtype()}[{self.plan.length}]")
        if not 0 < examples <= self.plan.weight_cap or weight != examples / self.plan.weight_cap:
            raise ValueError(f"weight {weight:g} is not num-examples {examples} / weight cap {self.plan.weight_cap}")
        try:
            vector = array_values(array)  # what the header says, which must be what was declared
        except ValueError as exc:
            raise ValueError(f"malformed masked vector: {exc}") from None
        return vector, weight, examples, clipped

    def _check_reveal(self, node: int, revealed: dict[int, tuple[str, bytes]], masked: dict) -> None:
        """A node's unmask answer, as far as the server can check it: a share for each of its
        holders exactly, of the kind their fate calls for, of a share's size, with the index the
        holder's secret gave this node. Else ValueError: the node counts as dropped and the
        others' shares unmask the sum, where one bad answer used to fail the round for all."""
        if sorted(revealed) != self.holders[node]:
            raise ValueError(f"shares for {sorted(revealed)}, not for its holders {self.holders[node]}")
        for j, (kind, share) in revealed.items():
            if kind != ("b" if j in masked else "s"):
                raise ValueError(f"the {kind!r} share of node {j}, whose fate calls for the other")
            if len(share) != secagg.SHARE_BYTES or share[0] != self.graph[j].index(node) + 1:
                raise ValueError(f"a share of node {j} that is not the one it was dealt ({len(share)} bytes)")

    def _consistency(self, server_round: int, survivors: list[int], stage_config: ConfigRecord) -> dict[int, bytes]:
        """Bonawitz et al.'s consistency check: every survivor signs the one survivor set, and
        only those whose signature verifies are asked to unmask (with all the signatures)."""
        statement = survivors_statement(self.plan.context(), survivors)

        def signature(node, record, content):
            sig = bytes(record["sig"])
            if not signed_by(self.ads[node].identity, sig, statement):
                raise ValueError("its signature over the survivor set does not verify")
            return sig

        signatures = self._exchange(server_round, "consistency", CONSISTENCY, {node: {"survivors": survivors} for node in survivors},
                                    stage_config, signature)
        self._require(len(signatures), "consistency", server_round, needed=quorum(self.plan.threshold, len(self.ads)))
        return signatures

    def check_reply(self, content: RecordDict) -> None:
        """Raise ValueError saying what is wrong with a training reply (access control calls it)."""
        self._parse(content)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = [r for r in replies if not r.has_error()]  # access control already turned bad ones into errors
        if self.plan is None:
            return None, None
        masked, weights, examples, clipped = {}, {}, 0, 0
        for reply in ok:
            vector, weight, count, clip = self._parse(reply.content)
            node = reply.metadata.src_node_id
            masked[node], weights[node] = vector, weight
            examples, clipped = examples + count, clipped + clip
        self.dropped["train"] = sorted(set(self.holders) - set(masked))
        self._require(len(masked), "train", server_round, [r.error.reason for r in replies if r.has_error()])

        survivors = sorted(masked)
        stage_config = ConfigRecord({**self.config.to_flat(), "server-round": server_round})
        signatures = self._consistency(server_round, survivors, stage_config)

        def revealed_shares(node, record, content):
            revealed = {int(j): (str(k), bytes(s)) for j, k, s in zip(record["ids"], record["kinds"], record["shares"], strict=True)}
            self._check_reveal(node, revealed, masked)
            return revealed

        signers = sorted(signatures)
        request = {"signers": signers, "signatures": [signatures[j] for j in signers]}
        revealed = list(self._exchange(server_round, "unmask", UNMASK, {node: request for node in signers}, stage_config,
                                       revealed_shares).values())
        try:
            total = unmask_sum(masked, revealed, {n: p[1] for n, p in self.publics.items()},
                               {n: self.holders[n] for n in survivors}, self.plan.threshold, self.plan.bits, self.plan.context())
        except ValueError as exc:
            raise RoundFailed(f"round {server_round}: the masks could not be removed: {exc}. The run stopped rather "
                              "than continue with an unchanged model") from None
        total_weight = sum(weights.values())
        average = self.codec.decode(total, len(survivors), total_weight, self.plan)
        if clipped:
            log(WARNING, "secagg: %d values were clipped to their range in round %d (raise secagg-range)", clipped, server_round)
        self.last = {
            "mode": "secagg", "bits": self.plan.bits, "value_bits": self.plan.value_bits, "threshold": self.plan.threshold,
            "neighbourhood": max(len(v) for v in self.graph.values()), "sampled": self.plan.max_terms,
            "terms": len(survivors), "total_weight": total_weight, "weight_cap": self.plan.weight_cap,
            "range_exponents": list(self.plan.exponents), "clipped": clipped,
            "error_bound": self.codec.error_bound(len(survivors), total_weight, self.plan),
            "dropped": self._dropped_counts(),
        }
        return self.inner.aggregate_train(server_round, [average_as_reply(average, ok, examples)])
