"""``ThresholdStrategy``: gives a sum strategy the decrypted sum of ciphertexts that no single
party can decrypt (privacy=he-threshold).

It holds the key ceremony at the start of the run, then wraps any Flower strategy whose aggregate
is an example-weighted average, as SecAggStrategy does: the wrapped strategy samples and
configures the round; this class adds the clients' ciphertexts, has the committee decrypt the
sum (standing in, with a quorum's help, for members that did not answer), and hands the wrapped
strategy one reply holding the decoded average, so its own server step (momentum, Adam, ...)
runs unchanged and the server can test the model.

What the server holds: the public context and joint key, the members' key shares sealed under
keys it never sees, and, only for members that dropped out, the key shares a quorum recovered for
it (in memory, for this run). It never holds enough shares to decrypt one client's ciphertext
unless a quorum of members colludes with it. A decryption that fewer than the quorum answer
raises RoundFailed: the run stops, audited, rather than continue with an unchanged model.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from crypto import secagg, threshold
from crypto.threshold import KeyShare, ThresholdError
from fedlearn import he
from fedlearn.config import RunConfig
from fedlearn.encoding import FixedPointCodec
from fedlearn.errors import ConfigError, FederationError, RoundFailed
from fedlearn.messages import NODE_RECORD, NUM_EXAMPLES_KEY, PARTITION_KEY
from fedlearn.threshold import DECRYPT, HOLD, JOIN, KEYGEN, RECORD, REVEAL, Committee, RoundPlan
from server.grid import parsed_replies, round_weight_cap
from server.privacy import HidingStrategy
from server.secagg import average_as_reply

T = TypeVar("T")


class ThresholdStrategy(HidingStrategy):
    def __init__(self, inner: Strategy, config: RunConfig, template: dict[str, np.ndarray]):
        super().__init__(inner, config, template)
        self.codec = FixedPointCodec(template)
        self.committee: Committee | None = None
        self.recovered: dict[int, KeyShare] = {}  # member -> key share a quorum recovered after it dropped out
        self.counts: dict[int, int] = {}  # node id -> training examples it reported
        self.plan: RoundPlan | None = None
        self.grid: Grid | None = None

    def summary(self) -> None:
        log(INFO, "\t├── privacy: he-threshold (BFV, %d-of-%d committee), no party alone can decrypt",
            self.config.threshold_quorum_size(), self.config.threshold_committee)
        self.inner.summary()

    def _exchange(self, server_round: int, stage: str, message_type: str, records: dict[int, dict],
                  parse: Callable[[int, ConfigRecord, RecordDict], T], extra: dict | None = None) -> dict[int, T]:
        """Send one stage's requests; ``parse(node, threshold record, content)`` of each valid reply,
        by node (server.grid.parsed_replies)."""
        config = ConfigRecord({**self.config.to_flat(), "server-round": server_round})
        messages = [Message(RecordDict({"config": config, RECORD: ConfigRecord(record), **(extra or {})}),
                            dst_node_id=node, message_type=message_type) for node, record in records.items()]
        return parsed_replies(self.grid, messages, self.config.threshold_timeout, RECORD, parse,
                              f"he-threshold: round {server_round}, {stage} stage")

    # -- the key ceremony ---------------------------------------------------------------
    @classmethod
    def preflight(cls, config: RunConfig) -> None:
        """OpenFHE's bindings, or a ConfigError that says how to get them (before the run directory
        exists, and before `fedlearn simulate` starts the simulation)."""
        try:
            threshold.openfhe()
        except ImportError as exc:
            raise ConfigError([str(exc)]) from None

    def prepare(self, grid: Grid, audit) -> None:
        """Before any round: the key every update is encrypted under."""
        audit.append("key_ceremony", 0, self.hold_ceremony(grid).facts())

    def hold_ceremony(self, grid: Grid) -> Committee:
        """Choose the committee among the connected keyholders, have each member make its key
        share in turn, and hand out the sealed Shamir shares. Every member must take part: a
        ceremony that loses one raises FederationError, before any update is encrypted."""
        self.grid = grid
        size, quorum = self.config.threshold_committee, self.config.threshold_quorum_size()
        ceremony, context = secrets.token_hex(16), threshold.new_context()
        nodes = list(grid.get_node_ids())

        def agreement_key(node, record, content):
            key = bytes(record["agreement-key"])
            if not secagg.is_usable_public(key):  # a low-order key: every member's agreement with it would fail
                raise ValueError("not a usable X25519 public key (32 bytes, not a low-order point)")
            return key, int(content[NODE_RECORD][PARTITION_KEY])

        joined = self._exchange(0, "join", JOIN, {node: {"ceremony": ceremony} for node in nodes}, agreement_key)
        if len(joined) < size:
            raise FederationError(
                f"the key ceremony needs a committee of threshold-committee={size} key holders, but {len(joined)} of the "
                f"{len(nodes)} connected nodes answered as one: enroll more nodes with the keyholder role "
                "(`fedlearn keys enroll --role keyholder ...`), start more nodes, or lower threshold-committee"
            )
        members = sorted(joined, key=lambda node: (joined[node][1], node))[:size]  # by partition id
        peers = [joined[node][0] for node in members]
        public, sealed_shares, inbox = b"", [], {j: {} for j in range(size)}  # receiver -> sender -> sealed share
        for i, node in enumerate(members):
            def key_material(node, record, content, i=i):
                shares = [bytes(s) for s in record["shares"]]
                if len(shares) != size:
                    raise ValueError(f"{len(shares)} sealed shares for a committee of {size}")
                return bytes(record["public"]), bytes(record["sealed-share"]), shares

            request = {"ceremony": ceremony, "context": context, "member": i, "quorum": quorum,
                       "previous-public": public, "agreement-keys": peers}
            made = self._exchange(0, f"keygen of member {i}", KEYGEN, {node: request}, key_material)
            if node not in made:
                raise FederationError(
                    f"the key ceremony lost member {i} (node {node}, partition {joined[node][1]}) while it made its key "
                    f"share (no valid answer within threshold-timeout={self.config.threshold_timeout:g}s): every member "
                    "must take part; restart the run once the node is back"
                )
            public, sealed, shares = made[node]
            sealed_shares.append(sealed)
            for j, blob in enumerate(shares):
                if j != i:
                    inbox[j][i] = blob
        holds = {members[j]: {"ceremony": ceremony, "from": sorted(inbox[j]), "sealed": [inbox[j][i] for i in sorted(inbox[j])],
                              "agreement-keys": peers} for j in range(size)}
        held = self._exchange(0, "hold", HOLD, holds, lambda node, record, content: int(record["held"]))
        lost = [i for i, node in enumerate(members) if held.get(node) != size - 1]
        if lost:
            raise FederationError(f"the key ceremony lost members {lost} while they took their Shamir shares: restart the run")
        self.committee = Committee(ceremony, context, public, tuple(members), tuple(joined[n][1] for n in members),
                                   quorum, tuple(sealed_shares))
        log(INFO, "he-threshold: key ceremony done, committee of %d (quorum %d): partitions %s", size, quorum,
            list(self.committee.partitions))
        return self.committee

    # -- training -----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.committee is None:
            raise RuntimeError("hold_ceremony() must run before the first round")
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        self.grid = grid
        nodes = [m.metadata.dst_node_id for m in messages]
        cap = round_weight_cap(grid, nodes, self.counts, {**self.config.to_flat(), "server-round": server_round},
                               self.config.round_timeout)
        encoding = self.config.threshold_encoding(len(nodes))
        exponents = self.codec.range_exponents({k: v.numpy() for k, v in arrays.items()},
                                               self.config.threshold_range_factor(encoding.bits))
        self.plan = RoundPlan(encoding.bits, len(nodes), cap, tuple(exponents))
        record = ConfigRecord({**self.plan.to_record(), "context": self.committee.context,
                               "joint-public": self.committee.joint_public})
        for content in {id(m.content): m.content for m in messages}.values():
            content[RECORD] = record
        return messages

    def _parse(self, content: RecordDict) -> tuple[list[bytes], float, int, int]:
        """(ciphertexts, weight, examples, clipped) of an encrypted training reply, checked."""
        if self.plan is None:
            raise ValueError("no he-threshold round is open")
        if RECORD not in content or "arrays" not in content or not isinstance(content["arrays"], ArrayRecord):
            raise ValueError("not an encrypted update (no threshold record or no ciphertexts): is the node in privacy=he-threshold?")
        try:
            record = content[RECORD]
            weight, clipped = float(record["weight"]), int(record["clipped"])
            examples = int(content["metrics"][NUM_EXAMPLES_KEY])
            blobs = he.record_chunks(content["arrays"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"malformed encrypted update ({exc})") from None
        if not 0 < examples <= self.plan.weight_cap or weight != examples / self.plan.weight_cap:
            raise ValueError(f"weight {weight:g} is not num-examples {examples} / weight cap {self.plan.weight_cap}")
        return blobs, weight, examples, clipped

    def check_reply(self, content: RecordDict) -> None:
        """Raise ValueError saying what is wrong with a training reply (access control calls it)."""
        blobs = self._parse(content)[0]
        threshold.check_ciphertexts(self.committee.context, blobs, self.codec.length)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok = [r for r in replies if not r.has_error()]  # access control already turned bad ones into errors
        if self.plan is None or not ok:
            return None, None
        if len(ok) < 2:
            raise RoundFailed(
                f"round {server_round}: one encrypted update arrived, and decrypting the sum of one client is "
                "decrypting its update: the run stopped; start more nodes or lower the dropouts"
            )
        parsed = [self._parse(r.content) for r in ok]
        context = self.committee.context
        started = time.perf_counter()
        total = threshold.add(context, [blobs for blobs, *_ in parsed])
        add_seconds = time.perf_counter() - started
        partials, facts = self._decrypt(server_round, total)
        started = time.perf_counter()
        values = threshold.fuse(context, partials, len(self.committee.nodes), self.codec.length)
        fuse_seconds = time.perf_counter() - started
        weights = [weight for _, weight, _, _ in parsed]
        clipped = sum(c for *_, c in parsed)
        average = self.codec.decode(values, len(ok), sum(weights), self.plan)
        if clipped:
            log(WARNING, "he-threshold: %d values were clipped to their range in round %d (raise threshold-range)", clipped, server_round)
        self.last = {
            "mode": "he-threshold", "scheme": "bfv", "ring_dimension": threshold.RING_DIMENSION,
            "committee": len(self.committee.nodes), "quorum": self.committee.quorum,
            "joint_public_key_digest": self.committee.facts()["joint_public_key_digest"],
            "value_bits": self.plan.value_bits, "sampled": self.plan.max_terms, "terms": len(ok),
            "total_weight": sum(weights), "weight_cap": self.plan.weight_cap, "range_exponents": list(self.plan.exponents),
            "clipped": clipped, "error_bound": self.codec.error_bound(len(ok), sum(weights), self.plan),
            "add_seconds": round(add_seconds, 4), "fuse_seconds": round(fuse_seconds, 4), **facts,
        }
        examples = sum(count for _, _, count, _ in parsed)
        return self.inner.aggregate_train(server_round, [average_as_reply(average, ok, examples)])

    def _decrypt(self, server_round: int, total: list[bytes]) -> tuple[dict[int, list[bytes]], dict]:
        """Every member's partial decryption of ``total``: asked of the members, computed here for
        those whose share a quorum recovered (now, or in an earlier round)."""
        committee = self.committee
        member_of = {node: i for i, node in enumerate(committee.nodes)}

        def partial(node, record, content):
            blobs = he.record_chunks(content["arrays"])
            if len(blobs) != len(total):
                raise ValueError(f"{len(blobs)} partial decryptions of {len(total)} ciphertexts")
            return blobs

        asked = {node: {"ceremony": committee.ceremony, "context": committee.context}
                 for i, node in enumerate(committee.nodes) if i not in self.recovered}
        answered = self._exchange(server_round, "decrypt", DECRYPT, asked, partial, {"arrays": he.encrypted_record(total)})
        partials = {member_of[node]: blobs for node, blobs in answered.items()}
        present = sorted(partials)
        missing = sorted(set(range(len(committee.nodes))) - set(partials) - set(self.recovered))
        if missing:
            self._recover(server_round, present, missing)
        for member, share in self.recovered.items():
            if member not in partials:
                partials[member] = threshold.partial_decrypt(committee.context, share, total)
        return partials, {"decrypted_by": present, "recovered_members": sorted(self.recovered), "recovered_now": missing}

    def _recover(self, server_round: int, present: list[int], missing: list[int]) -> None:
        """Recover the key shares of ``missing`` members with the Shamir shares of ``present`` ones."""
        committee, quorum = self.committee, self.committee.quorum

        def fail(why: str) -> RoundFailed:
            return RoundFailed(
                f"round {server_round}: decryption needs {quorum} of the {len(committee.nodes)} key holders; {why}. "
                "Nothing was decrypted and the run stopped rather than continue with an unchanged model: bring key "
                "holders back (members are partitions " + ", ".join(map(str, committee.partitions)) + ") and resume, "
                "or start a new run with a committee that can lose more members (threshold-committee, threshold-quorum)"
            )

        if len(present) < quorum:
            raise fail(f"{len(present)} answered (members {present}), members {missing} did not")

        def revealed(node, record, content):
            return dict(zip((int(m) for m in record["ids"]), (bytes(s) for s in record["shares"]), strict=True))

        asked = {committee.nodes[m]: {"ceremony": committee.ceremony, "missing": missing} for m in present}
        answers = list(self._exchange(server_round, "reveal", REVEAL, asked, revealed).values())
        for member in missing:
            shares = [answer[member] for answer in answers if member in answer]
            if len(shares) < quorum:
                raise fail(f"{len(shares)} members revealed their Shamir shares of member {member}'s key share")
            try:
                self.recovered[member] = threshold.recover_share(committee.sealed_shares[member], member, shares, quorum)
            except ThresholdError as exc:
                raise fail(str(exc)) from None
        log(WARNING, "he-threshold: round %d: members %s did not answer; a quorum recovered their key shares", server_round, missing)
