"""server.access.AccessGrid: every kind of bad reply is turned into an audited error reply."""

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from clients.app import reply
from crypto import signing
from fedlearn.access import AccessPolicy
from fedlearn.audit import read
from fedlearn.config import RunConfig
from fedlearn.messages import NODE_RECORD, NUM_EXAMPLES_KEY, NUM_EXAMPLES_QUERY, PARTITION_KEY
from fedlearn.secagg import ADVERTISE, SHARE, UNMASK
from server.access import AccessGrid
from server.app import initial_arrays
from server.grid import payload_bytes, round_weight_cap
from tests.helpers import access_setup as setup  # noqa: F401  (fixture)
from tests.helpers import assert_log_verifies, message

CONFIG = RunConfig.from_flat({"num-clients": 4, "model": "logreg"})


class ScriptedGrid:
    """The Grid below AccessGrid: answers each message with what the test scripted for its node."""

    def __init__(self, script):
        self.script = script

    def send_and_receive(self, messages, *, timeout=None):
        return [r for m in messages for r in self.script[m.metadata.dst_node_id](m)]


def update(msg, scale=1.0):
    sent = msg.content["arrays"]
    return {k: (v.numpy() * scale + 0.01).astype(v.numpy().dtype) for k, v in sent.items()}


def record(arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def honest(key, partition=0):
    def answer(msg):
        return [reply(msg, partition, key, arrays=record(update(msg)), metrics=MetricRecord({"num-examples": 7}))]
    return answer


def exchange(setup, script, server_round=2, grid=None, message_type=MessageType.TRAIN, **options):
    keys, policy, audit = setup
    content = RecordDict({"arrays": initial_arrays(CONFIG), "config": ConfigRecord({"server-round": server_round})})
    messages = [message(content, src=1, dst=node, message_type=message_type) for node in script]
    grid = grid or AccessGrid(ScriptedGrid(script), policy, audit, "run-A", model=initial_arrays(CONFIG), **options)
    grid._grid.script = script  # the ScriptedGrid below
    replies = list(grid.send_and_receive(messages))
    return replies, grid.take_round(), read(audit.path)


def tampered_challenge(key, **change):
    def answer(msg):
        challenge = dict(msg.content["auth"])
        msg.content["auth"] = ConfigRecord({**challenge, **change})
        out = honest(key)(msg)
        msg.content["auth"] = ConfigRecord(challenge)
        return out
    return answer


def forged(key):
    def answer(msg):
        (signed,) = honest(key)(msg)
        signed.content["arrays"] = record(update(msg, scale=100.0))  # altered after signing
        return [signed]
    return answer


def signed_arrays(key, arrays_of):
    def answer(msg):
        return [reply(msg, 0, key, arrays=record(arrays_of(msg)), metrics=MetricRecord({"num-examples": 7}))]
    return answer


def test_each_bad_reply_is_rejected_with_its_reason_and_audited(setup):
    keys = setup[0]
    nan = lambda msg: {k: np.full_like(v, np.nan) for k, v in update(msg).items()}  # noqa: E731
    wrong_shape = lambda msg: {k: np.zeros((2, 2), np.float32) for k in update(msg)}  # noqa: E731
    script = {
        101: honest(keys["good"]),
        102: honest(keys["unknown"]),
        103: honest(keys["revoked"]),
        104: honest(keys["evaluator"]),
        105: forged(keys["good"]),
        106: tampered_challenge(keys["good"], **{"run-id": "run-B"}),
        107: tampered_challenge(keys["good"], round=1),
        108: tampered_challenge(keys["good"], nonce="0" * 32),
        109: lambda msg: [reply(msg, 0, None, arrays=record(update(msg)))],
        110: signed_arrays(keys["nan"], nan),
        111: signed_arrays(keys["shape"], wrong_shape),
    }
    replies, seen, records = exchange(setup, script)
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert not by_node[101].has_error()
    expected = {
        102: "unknown key",
        103: "revoked key of 'revoked' (compromised)",
        104: "role: 'evaluator' may not act as trainer",
        105: "bad signature",
        106: "wrong run: signed for run run-B, this is run run-A",
        107: "wrong round: signed for round 1, this is round 2 (replay)",
        108: "replayed nonce",
        109: "unsigned reply",
        110: "non-finite update",
        111: "malformed update",
    }
    for node, reason in expected.items():
        assert by_node[node].has_error() and reason in by_node[node].error.reason, (node, by_node[node].error)
    assert (seen.accepted, seen.rejected, seen.examples) == (1, len(expected), 7)
    rejected = {r["data"]["node_id"]: r["data"]["reason"] for r in records if r["event"] == "update_rejected"}
    assert set(rejected) == set(expected) and all(reason in rejected[n] for n, reason in expected.items())
    (accepted,) = [r for r in records if r["event"] == "update_accepted"]
    assert accepted["data"]["node"] == "good" and accepted["data"]["fingerprint"] == signing.fingerprint(keys["good"])
    (start,) = [r for r in records if r["event"] == "round_start"]
    assert start["round"] == 2 and sorted(start["data"]["sampled"]) == sorted(script)


def test_a_second_reply_to_the_same_request_is_a_replay(setup):
    keys = setup[0]
    replies, seen, _ = exchange(setup, {101: lambda msg: honest(keys["good"])(msg) * 2}, message_type=MessageType.EVALUATE)
    assert [r.has_error() for r in replies] == [False, True]
    assert "duplicate reply: good already answered this request" in replies[1].error.reason


def test_each_request_gets_a_fresh_nonce_bound_to_run_and_round(setup):
    keys, policy, audit = setup
    content = RecordDict({"arrays": initial_arrays(CONFIG), "config": ConfigRecord({"server-round": 1})})
    grid = AccessGrid(ScriptedGrid({101: honest(keys["good"])}), policy, audit, "run-A", model=initial_arrays(CONFIG))
    challenges = []
    for _ in range(2):
        fresh = RecordDict(dict(content))
        grid.send_and_receive([message(fresh, src=1, dst=101)])
        challenges.append(dict(fresh["auth"]))
    assert challenges[0]["nonce"] != challenges[1]["nonce"] and len(challenges[0]["nonce"]) == 32
    assert challenges[0]["run-id"] == "run-A" and challenges[0]["round"] == 1
    assert json.dumps(challenges)  # plain values only


def test_a_node_that_never_answers_is_audited(setup):
    keys = setup[0]
    replies, seen, records = exchange(setup, {101: honest(keys["good"]), 102: lambda msg: []})
    assert len(replies) == 1 and seen.accepted == 1
    (failed,) = [r["data"] for r in records if r["event"] == "node_failed"]
    assert failed["node_id"] == 102 and failed["reason"] == "no reply"


def test_updates_are_checked_against_the_model_not_the_dtype_a_strategy_sent(setup):
    """Flower's FedAdam sends float64 globals; nodes answer with the model's float32 arrays."""
    keys, policy, audit = setup
    as64 = ArrayRecord({k: Array(v.numpy().astype(np.float64)) for k, v in initial_arrays(CONFIG).items()})
    content = RecordDict({"arrays": as64, "config": ConfigRecord({"server-round": 2})})
    float32 = signed_arrays(keys["good"], lambda msg: {k: v.astype(np.float32) for k, v in update(msg).items()})
    grid = AccessGrid(ScriptedGrid({101: float32}), policy, audit, "run-A", model=initial_arrays(CONFIG))
    (answer,) = grid.send_and_receive([message(content, src=1, dst=101)])
    assert not answer.has_error(), answer.error


def test_a_privacy_modes_update_check_replaces_the_shape_check_and_its_refusals_are_audited(setup):
    keys, policy, audit = setup

    def encrypted_only(content):
        if "he" not in content:
            raise ValueError("not an encrypted update")

    content = RecordDict({"arrays": initial_arrays(CONFIG), "config": ConfigRecord({"server-round": 1})})
    grid = AccessGrid(ScriptedGrid({101: honest(keys["good"])}), policy, audit, "run-A",
                      model=initial_arrays(CONFIG), check_update=encrypted_only)
    (refused,) = grid.send_and_receive([message(content, src=1, dst=101)])
    assert refused.has_error() and "malformed update: not an encrypted update" in refused.error.reason
    rejected = [r for r in read(audit.path) if r["event"] == "update_rejected"]
    assert rejected[0]["data"]["reason"] == "malformed update: not an encrypted update"


def reply_bytes(answer):
    """The payload size AccessGrid meters for ``answer``'s reply (signatures and nonces have fixed
    lengths, so every exchange gives the same size)."""
    content = RecordDict({"arrays": initial_arrays(CONFIG), "config": ConfigRecord({"server-round": 2}),
                          "auth": ConfigRecord({"run-id": "run-A", "round": 2, "nonce": "0" * 32})})
    (sent,) = answer(message(content, src=1, dst=101))
    return payload_bytes(sent.content)


def test_an_oversized_update_is_rejected_and_audited_and_the_limit_is_configurable(setup):
    keys = setup[0]
    size = reply_bytes(honest(keys["good"]))  # ~3 KB for logreg
    replies, seen, records = exchange(setup, {101: honest(keys["good"])}, max_update_bytes=size - 1)
    reason = f"oversized update: {size:,} bytes exceeds the limit of {size - 1:,} bytes (raise max-update-mb"
    assert replies[0].has_error() and reason in replies[0].error.reason and seen.accepted == 0
    (rejected,) = [r["data"] for r in records if r["event"] == "update_rejected"]
    assert rejected["reason"].startswith(reason) and rejected["node_id"] == 101
    replies, seen, _ = exchange(setup, {101: honest(keys["good"])}, server_round=3, max_update_bytes=size)
    assert not replies[0].has_error() and seen.accepted == 1  # exactly at the limit
    assert_log_verifies(setup)


def test_the_automatic_limit_follows_the_model():
    model = initial_arrays(CONFIG)
    parameters = sum(int(np.prod(a.shape)) for a in model.values())
    grid = AccessGrid(ScriptedGrid({}), AccessPolicy(), None, "run-A", model=model)
    assert grid.max_update_bytes == 128 * parameters + 2**20 == CONFIG.max_update_bytes(parameters)
    assert CONFIG.replace(max_update_mb=2.5).max_update_bytes(parameters) == int(2.5 * 2**20)


def test_duplicate_updates_are_rejected_and_audited_and_each_round_starts_afresh(setup):
    keys, policy, audit = setup
    grid = AccessGrid(ScriptedGrid({}), policy, audit, "run-A", model=initial_arrays(CONFIG))
    script = {
        101: honest(keys["good"]),
        102: honest(keys["good"]),  # a second SuperNode running with the same node key
        103: honest(keys["nan"]),  # another identity sending a copy of good's update
    }
    replies, seen, records = exchange(setup, script, grid=grid)
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert not by_node[101].has_error() and seen.accepted == 1
    assert "duplicate update: node good already sent an update this round (two SuperNodes share one node key?)" in (
        by_node[102].error.reason
    )
    assert "duplicate update: identical to the update from good" in by_node[103].error.reason
    rejected = {r["data"]["node_id"]: r["data"]["reason"] for r in records if r["event"] == "update_rejected"}
    assert set(rejected) == {102, 103} and all(reason.startswith("duplicate update") for reason in rejected.values())
    (accepted,) = [r["data"] for r in records if r["event"] == "update_accepted"]
    assert accepted["node_id"] == 101

    replies, _, _ = exchange(setup, {102: honest(keys["good"], partition=1)}, grid=grid)  # same round, new request
    assert "duplicate update: node good already sent an update this round" in replies[0].error.reason
    replies, seen, _ = exchange(setup, {102: honest(keys["good"])}, server_round=3, grid=grid)
    assert not replies[0].has_error() and seen.accepted == 1  # a new round: good may send again
    assert_log_verifies(setup)


def test_secure_aggregation_stages_do_not_count_as_updates(setup):
    """Under secagg a node answers advertise, share and unmask besides train in one round."""
    keys, policy, audit = setup
    grid = AccessGrid(ScriptedGrid({}), policy, audit, "run-A", model=initial_arrays(CONFIG))
    for stage in (ADVERTISE, SHARE, MessageType.TRAIN, UNMASK):
        replies, _, _ = exchange(setup, {101: honest(keys["good"])}, grid=grid, message_type=stage)
        assert not replies[0].has_error(), (stage, replies[0].error)


def test_a_rejected_update_does_not_count_as_the_nodes_update(setup):
    """Only accepted updates block: a node whose first reply failed a check may still send one."""
    keys, policy, audit = setup
    nan = signed_arrays(keys["good"], lambda msg: {k: np.full_like(v, np.nan) for k, v in update(msg).items()})
    grid = AccessGrid(ScriptedGrid({}), policy, audit, "run-A", model=initial_arrays(CONFIG))
    replies, seen, _ = exchange(setup, {101: lambda msg: nan(msg) + honest(keys["good"])(msg)}, grid=grid)
    assert [r.has_error() for r in replies] == [True, False] and seen.accepted == 1


def test_the_example_count_query_is_signed_verified_and_audited(setup, run_identity):
    """Issue 22 (he, he-threshold): failed before: the weight cap's example-count query went out
    unchallenged and its answers were neither verified nor audited, so anyone answering for a
    node set the cap every honest weight is divided by (and a NaN count raised). Now an
    unsigned, unenrolled or malformed answer is rejected and audited, and left out of the cap."""
    keys, policy, audit = setup

    def count(key, n):
        return lambda msg: [reply(msg, 0, key, **{NODE_RECORD: ConfigRecord({PARTITION_KEY: 0, NUM_EXAMPLES_KEY: n})})]

    script = {101: count(keys["good"], 40), 102: count(None, 10**9), 103: count(keys["unknown"], 10**9),
              104: count(keys["nan"], float("nan")), 105: count(keys["shape"], "many")}
    grid = AccessGrid(ScriptedGrid(script), policy, audit, "run-A", model=initial_arrays(CONFIG))
    counts = {}
    assert round_weight_cap(grid, list(script), counts, {"server-round": 3}, timeout=5) == 40 and counts == {101: 40}
    records = read(audit.path)
    rejected = {r["data"]["node_id"]: r["data"]["reason"] for r in records if r["event"] == "update_rejected"}
    assert "unsigned" in rejected[102] and "unknown key" in rejected[103]
    assert "malformed node.num-examples" in rejected[104] and "malformed node.num-examples" in rejected[105]
    (accepted,) = [r for r in records if r["event"] == "update_accepted"]
    assert accepted["data"]["kind"] == NUM_EXAMPLES_QUERY and accepted["data"]["num_examples"] == 40
