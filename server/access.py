"""Access control on the wire: challenge every request, verify every reply, audit both.

``AccessGrid`` sits between the strategy and Flower's Grid. Each training or evaluation
request gets a fresh nonce in an ``auth`` record; each reply must carry a signature, by a key
the policy lets act in that role, over (run id, round, nonce, kind, digest of the reply). A
reply that fails any check is turned into an error reply, so Flower's strategies drop it
exactly as they drop a failed node: it never reaches aggregation.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType

from crypto import signing
from crypto.digest import sha256_hex
from fedlearn.access import (
    AccessPolicy,
    Member,
    provision_simulation,
    role_for,
    run_digest,
    update_statement,
)
from fedlearn.audit import AuditLog
from fedlearn.checkpoint import CheckpointError
from fedlearn.config import RunConfig
from fedlearn.errors import AccessDenied, ConfigError
from fedlearn.messages import AUTH_RECORD, NODE_RECORD, NUM_EXAMPLES_KEY, PARTITION_KEY, payload_digest
from fedlearn.runs import RunStore
from server.grid import GridWrapper
from fedlearn.updates import Rejected, check_plain_update, check_size

REJECTED = 403  # error code of a reply the server refused (Flower's own codes are small integers)


def load_credentials(config: RunConfig):
    """The access policy and audit key the config names (None where it names none).

    Called before the run directory exists, so a missing or broken file costs nothing."""
    policy = AccessPolicy.load(config.access_policy) if config.access_policy else None
    audit_key = None
    if config.audit_key:
        try:
            audit_key = signing.load_private(config.audit_key)
        except signing.KeyFileError as exc:
            raise ConfigError([f"audit-key: {exc}"]) from None
    return policy, audit_key


@dataclass
class AuditedRun:
    config: RunConfig  # as run: in simulation, pointing at the generated policy and keys
    policy: AccessPolicy
    audit: AuditLog
    operator: Member


def open_audited_run(
    config: RunConfig, store: RunStore, policy: AccessPolicy | None, audit_key, start_facts: dict
) -> AuditedRun:
    """Open the run's audit log and check that an enrolled operator signed this config.

    Without a policy (simulation), generate per-run node keys, an operator and a policy in
    the run directory first, so the same checks run. A refused run is audited, then raised."""
    mode = "policy"
    if policy is None:
        policy_path, config = provision_simulation(store.directory, config)
        policy = AccessPolicy.load(policy_path)
        store.update_config(config)
        mode = "simulation: per-run policy and keys generated in the run directory"
    if audit_key is None:
        _, _, audit_key = signing.write_keypair(store.directory, "audit")
    else:
        signing.write_public(audit_key, store.directory / "audit.pub")
    audit = AuditLog(store.directory / "audit.jsonl", audit_key, store.run_id)
    facts = {
        "config_digest": run_digest(config),
        "policy_digest": policy.digest(),
        "policy": config.access_policy,
        "audit_key": audit.key_fingerprint,
        "mode": mode,
    }
    try:
        operator = policy.authorising_operator(config, config.run_signature)
    except AccessDenied as exc:
        audit.append("run_refused", 0, {**facts, "reason": str(exc)})
        audit.close()
        raise AccessDenied(f"run refused: {exc} (audited in {audit.path})") from None
    facts["operator"] = {"name": operator.name, "fingerprint": operator.fingerprint}
    audit.append("run_start", 0, {**facts, "config": config.to_flat(), **start_facts})
    return AuditedRun(config, policy, audit, operator)


def load_run_audit_key(run_dir: Path):
    """The audit key a run generated in its own directory (a simulation without audit-key)."""
    try:
        return signing.load_private(run_dir / "audit.key")
    except signing.KeyFileError as exc:
        raise ConfigError([f"resume: {exc}; a run without audit-key= keeps its audit key in its directory"]) from None


def reopen_audited_run(
    config: RunConfig, store: RunStore, policy: AccessPolicy | None, audit_key, checkpoint, start_facts: dict
) -> AuditedRun:
    """Continue a run's audit chain after a crash: the log must verify and agree with the
    checkpoint, and the config must still be authorised by an enrolled operator."""
    if policy is None:
        raise ConfigError(["resume: the run's config names no access-policy; its config.toml was edited?"])
    audit = AuditLog.reopen(store.directory / "audit.jsonl", audit_key, store.run_id)
    lines = audit.path.read_bytes().split(b"\n")
    if checkpoint.audit_seq > audit.seq or sha256_hex(lines[checkpoint.audit_seq - 1]) != checkpoint.audit_head:
        audit.close()
        raise CheckpointError(
            f"the checkpoint (round {checkpoint.round}, audit record {checkpoint.audit_seq - 1}) does not match "
            f"{audit.path}: they are from different runs or one was replaced"
        )
    try:
        operator = policy.authorising_operator(config, config.run_signature)
    except AccessDenied as exc:
        audit.append("run_refused", checkpoint.round, {"reason": f"resume refused: {exc}"})
        audit.close()
        raise AccessDenied(f"resume refused: {exc} (audited in {audit.path})") from None
    audit.append("run_resumed", checkpoint.round, {
        **start_facts,
        "from_round": checkpoint.round,
        "records_after_checkpoint": audit.seq - checkpoint.audit_seq,  # the interrupted round's, kept as evidence
        "checkpoint": checkpoint.digests(),
        "config_digest": run_digest(config),
        "operator": {"name": operator.name, "fingerprint": operator.fingerprint},
    })
    return AuditedRun(config, policy, audit, operator)


def _whole(value, what: str) -> int:
    """A count or id from a reply, which must be a non-negative whole number (not NaN, inf, a
    string, a fraction or a list): anything else is a rejection, never an exception."""
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 0:
        raise Rejected(f"malformed {what}: {str(value)[:40]!r} is not a non-negative whole number")
    return int(value)


@dataclass
class RoundAccess:
    """What access control saw in one round (for the round record and the audit)."""

    accepted: int = 0
    rejected: int = 0
    examples: int = 0
    update_digests: list[str] = field(default_factory=list)
    verify_seconds: float = 0.0  # server time spent checking replies
    sign_seconds: float = 0.0  # largest time a node reported spending to sign


class AccessGrid(GridWrapper):
    """``model`` gives the names, shapes and dtypes an update must have: the model's own, not
    those of the arrays sent (some strategies, e.g. Flower's FedAdam, send float64 globals).
    ``check_update`` replaces that check where updates are not plain arrays (privacy=he): it
    raises ValueError with the reason. ``max_update_bytes`` caps a training reply's payload
    (None: max-update-mb's automatic limit for ``model``, ``RunConfig.max_update_bytes``)."""

    def __init__(self, grid, policy: AccessPolicy, audit: AuditLog, run_id: str, model: ArrayRecord, check_update=None,
                 max_update_bytes: int | None = None):
        super().__init__(grid)
        parameters = sum(int(np.prod(array.shape)) for array in model.values())
        self.max_update_bytes = max_update_bytes or RunConfig().max_update_bytes(parameters)
        # Updates accepted this round, to refuse a second one from an identity or a copy of one.
        self._updates_round = 0
        self._updaters: set[str] = set()  # key fingerprints
        self._update_from: dict[str, str] = {}  # payload digest -> node name
        self.model = model
        self.check_update = check_update  # privacy modes whose updates are not the model's arrays
        self.policy = policy
        self.audit = audit
        self.run_id = run_id
        self._seen: set[tuple[str, str]] = set()  # (key fingerprint, nonce) already accepted
        self._started = 0  # the last round with a round_start record
        self._round = RoundAccess()
        self._pending: dict[str, Message] = {}  # pushed requests (fedbuff) by message id, until their reply
        self._asynchronous = False  # set by the first push: a node may then send several updates a round
        self._node_of: dict[str, int] = {}  # asynchronous: the node each key answers for

    def take_round(self) -> RoundAccess:
        taken, self._round = self._round, RoundAccess()
        return taken

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        kinds = {m.metadata.message_type for m in messages}
        if not messages or any(role_for(kind) is None for kind in kinds):
            return self._grid.send_and_receive(messages, timeout=timeout)
        kind = kinds.pop() if len(kinds) == 1 else "mixed"
        server_round = int(messages[0].content["config"]["server-round"])
        self._enter_round(server_round)
        nonce, challenge = self._challenge(server_round)
        for content in {id(m.content): m.content for m in messages}.values():
            content[AUTH_RECORD] = challenge
        if role_for(kind) == "trainer":
            self._audit_round_start(server_round, nonce, [m.metadata.dst_node_id for m in messages])
        sent = {m.metadata.dst_node_id: m for m in messages}
        checked, replied = [], set()
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            replied.add(reply.metadata.src_node_id)
            checked.append(self._check(reply, sent.get(reply.metadata.src_node_id), server_round, nonce))
        for node_id, request in sent.items():
            if node_id in replied:
                continue
            reason = f"no reply within round-timeout={timeout:g}s" if timeout else "no reply"
            facts = {"node_id": node_id, "kind": request.metadata.message_type, "reason": reason}
            self.audit.append("node_failed", server_round, facts, sync=False)
        self.audit.sync()  # every verdict is on disk before the strategy aggregates
        return checked

    def _challenge(self, server_round: int) -> tuple[str, ConfigRecord]:
        nonce = secrets.token_hex(16)
        return nonce, ConfigRecord({"run-id": self.run_id, "round": server_round, "nonce": nonce})

    def _enter_round(self, server_round: int) -> None:
        if server_round != self._updates_round:  # a new round: every node may send one update again
            self._updates_round, self._updaters, self._update_from = server_round, set(), {}

    def _audit_round_start(self, server_round: int, nonce: str, sampled: list[int]) -> None:
        """The round's first training message (plain training, or secure aggregation's first stage)."""
        if server_round != self._started:
            self.audit.append("round_start", server_round, {"nonce": nonce, "sampled": sampled}, sync=False)
            self._started = server_round

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Asynchronous strategies (fedbuff) push requests one by one: each gets its own challenge,
        kept with the request until its reply is pulled and checked like a synchronous one."""
        messages = list(messages)
        challenged = [m for m in messages if role_for(m.metadata.message_type) is not None]
        self._asynchronous = self._asynchronous or bool(challenged)
        for message in challenged:
            server_round = int(message.content["config"]["server-round"])
            nonce, message.content[AUTH_RECORD] = self._challenge(server_round)
            if role_for(message.metadata.message_type) == "trainer":
                self._audit_round_start(server_round, nonce, [message.metadata.dst_node_id])
        ids = list(self._grid.push_messages(messages))
        for message in challenged:  # the Grid gives each message its id as it pushes it
            self._pending[message.metadata.message_id] = message
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        checked = []
        for reply in self._grid.pull_messages(message_ids):
            request = self._pending.pop(reply.metadata.reply_to_message_id, None)
            if request is None:
                checked.append(reply)
                continue
            challenge = request.content[AUTH_RECORD]
            server_round = int(challenge["round"])
            self._enter_round(server_round)
            checked.append(self._check(reply, request, server_round, str(challenge["nonce"])))
        if checked:
            self.audit.sync()
        return checked

    def _check(self, reply: Message, request: Message | None, server_round: int, nonce: str) -> Message:
        node_id, kind = reply.metadata.src_node_id, reply.metadata.message_type
        if reply.has_error():
            self.audit.append(
                "node_failed", server_round, {"node_id": node_id, "kind": kind, "reason": reply.error.reason[-500:]}, sync=False
            )
            return reply
        started = time.perf_counter()
        facts: dict = {"node_id": node_id, "kind": kind}
        try:
            self._verify(reply, request, server_round, nonce, facts)
        except Rejected as exc:
            self._round.verify_seconds += time.perf_counter() - started
            self._round.rejected += 1
            self.audit.append("update_rejected", server_round, {**facts, "reason": str(exc)}, sync=False)
            return Message(Error(code=REJECTED, reason=f"update rejected by access control: {exc}"), metadata=reply.metadata)
        self._round.verify_seconds += time.perf_counter() - started
        if kind == MessageType.TRAIN:
            self._round.accepted += 1
            self._round.examples += facts.get("num_examples", 0)
            self._round.update_digests.append(facts["payload"])
        self.audit.append("update_accepted", server_round, facts, sync=False)
        return reply

    def _verify(self, reply: Message, request: Message | None, server_round: int, nonce: str, facts: dict) -> None:
        """Raise Rejected with the reason; fill ``facts`` with what the audit records."""
        content = reply.content
        is_update = reply.metadata.message_type == MessageType.TRAIN
        if is_update:  # first: a huge reply costs no hashing or parsing
            check_size(content, self.max_update_bytes)
        for fact, record, name in (("partition", NODE_RECORD, PARTITION_KEY), ("num_examples", "metrics", NUM_EXAMPLES_KEY),
                                   ("num_examples", NODE_RECORD, NUM_EXAMPLES_KEY)):
            if record in content and name in content[record]:
                facts[fact] = _whole(content[record][name], f"{record}.{name}")
        if AUTH_RECORD not in content:
            raise Rejected("unsigned reply: the node sent no auth record (is it running fedlearn's ClientApp?)")
        auth = content[AUTH_RECORD]
        try:
            public_key = signing.public_from_b64(str(auth["key"]))
            signature = bytes(auth["sig"])
            claimed = str(auth["run-id"]), int(auth["round"]), str(auth["nonce"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise Rejected(f"malformed auth record ({exc})") from None
        fingerprint = signing.fingerprint(public_key)
        facts["fingerprint"] = fingerprint
        member = self.policy.node(fingerprint, facts.get("partition"))
        if member is not None:
            facts["node"] = member.name
        refusal = self.policy.refusal(fingerprint, role_for(reply.metadata.message_type), facts.get("partition"))
        if refusal:
            raise Rejected(refusal)
        facts["payload"] = payload_digest(content)
        statement = update_statement(*claimed, reply.metadata.message_type, facts["payload"])
        if not signing.verify(public_key, signature, statement):
            raise Rejected("bad signature: the reply was not signed by this key, or was altered after signing")
        run_id, signed_round, signed_nonce = claimed
        if run_id != self.run_id:
            raise Rejected(f"wrong run: signed for run {run_id}, this is run {self.run_id}")
        if signed_round != server_round:
            raise Rejected(f"wrong round: signed for round {signed_round}, this is round {server_round} (replay)")
        if signed_nonce != nonce:
            raise Rejected("replayed nonce: this signed reply answers another request")
        who = facts.get("node", fingerprint[:16])
        if is_update:
            self._check_duplicate(fingerprint, who, facts["payload"], reply.metadata.src_node_id)
        if (fingerprint, nonce) in self._seen:
            raise Rejected(
                f"duplicate reply: {who} already answered this request "
                "(a resent reply, or two SuperNodes sharing one node key)"
            )
        if "sign-seconds" in auth:
            self._round.sign_seconds = max(self._round.sign_seconds, float(auth["sign-seconds"]))
        if is_update:
            if request is None:
                raise Rejected(f"unrequested reply: node {reply.metadata.src_node_id} was not asked to train")
            if self.check_update is None:
                check_plain_update(content, self.model)
            else:
                try:
                    self.check_update(content)
                except ValueError as exc:
                    raise Rejected(f"malformed update: {exc}") from None
            self._updaters.add(fingerprint)
            self._update_from[facts["payload"]] = who
        self._seen.add((fingerprint, nonce))

    def _check_duplicate(self, fingerprint: str, who: str, payload: str, node_id: int) -> None:
        """One update per identity and round: a second one means a resent reply or two SuperNodes
        sharing a key, and a copy of another node's update would count its data twice (a free
        rider, or a node echoing a victim's update to outweigh it). Asynchronous rounds (fedbuff)
        take several updates from a node, so there an identity must answer from one node only."""
        if self._asynchronous:
            bound = self._node_of.setdefault(fingerprint, node_id)
            if bound != node_id:
                raise Rejected(f"duplicate identity: {who}'s key already answers for node {bound} (two SuperNodes share one node key?)")
        elif fingerprint in self._updaters:
            raise Rejected(f"duplicate update: node {who} already sent an update this round (two SuperNodes share one node key?)")
        if payload in self._update_from:
            raise Rejected(f"duplicate update: identical to the update from {self._update_from[payload]}")
