"""Issue 22: real Flower simulations in which clients play each malicious role a privacy mode
knows of, with replies they sign themselves (so access control passes them to the mode's own
checks): every round completes with the honest clients, and each attacker is audited."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from clients.app import make_client_app, signed
from clients.identity import node_key
from fedlearn.audit import read
from fedlearn.config import RunConfig
from fedlearn.messages import AUTH_RECORD, HE_RECORD, SECAGG_RECORD
from fedlearn.secagg import ADVERTISE, CONSISTENCY, MASKED_ARRAY, SHARE, UNMASK
from fedlearn.threshold import JOIN
from fedlearn.threshold import RECORD as THRESHOLD_RECORD
from tests.helpers import audit_verdict, run_simulation

LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")  # order 8


def _set(record: str, key: str, value):
    def tamper(content):
        content[record] = ConfigRecord({**dict(content[record]), key: value})
    return tamper


def _first_share_short(content):
    record = content[SECAGG_RECORD]
    shares = [bytes(s) for s in record["shares"]]
    content[SECAGG_RECORD] = ConfigRecord({**dict(record), "shares": [shares[0][:5], *shares[1:]]})


def _oversized_first_seal(content):
    record = content[SECAGG_RECORD]
    sealed = [bytes(s) for s in record["sealed"]]
    content[SECAGG_RECORD] = ConfigRecord({**dict(record), "sealed": [sealed[0] + b"\0" * 1000, *sealed[1:]]})


def _short_masked_vector(content):
    content["arrays"] = ArrayRecord({MASKED_ARRAY: Array(np.zeros(3, dtype=np.uint16))})


def _lower_ranges(content):
    record = content[HE_RECORD]
    content[HE_RECORD] = ConfigRecord({**dict(record), "range-exp": [int(e) - 3 for e in record["range-exp"]]})


# partition -> (the message type it lies in, how): one attacker per role
ROLES = {
    "secagg": {
        0: (ADVERTISE, _set(SECAGG_RECORD, "c-public", LOW_ORDER)),
        1: (SHARE, _oversized_first_seal),
        2: ("train", _short_masked_vector),
        3: (CONSISTENCY, _set(SECAGG_RECORD, "sig", bytes(64))),
        4: (UNMASK, _first_share_short),
    },
    "he": {0: ("train", _lower_ranges)},
    "he-threshold": {0: (JOIN, _set(THRESHOLD_RECORD, "agreement-key", LOW_ORDER))},
}
STAGE_OF = {ADVERTISE: "advertise", SHARE: "share", "train": "train", CONSISTENCY: "consistency", UNMASK: "unmask"}


def attacker(msg, context, call_next):
    """A Flower client mod: the node answers as fedlearn's ClientApp would, then the attacker of
    its partition (if any) changes its reply and signs it again with the node's own key."""
    reply = call_next(msg, context)
    config = RunConfig.from_flat({k: v for k, v in msg.content["config"].items() if k != "server-round"}) \
        if "config" in msg.content else None
    partition = int(context.node_config["partition-id"])
    role = ROLES.get(config.privacy if config else "", {}).get(partition)
    if reply.has_error() or role is None or msg.metadata.message_type != role[0]:
        return reply
    content = reply.content
    role[1](content)
    del content[AUTH_RECORD]
    key = node_key(context, config, partition)
    return Message(signed(msg, content, key), reply_to=msg)


@pytest.mark.slow
@pytest.mark.parametrize("privacy, overrides", [
    ("secagg", {"num-clients": 10, "secagg-threshold": 3}),
    ("he", {"num-clients": 4, "strategy": "fedavg"}),
    ("he-threshold", {"num-clients": 4}),
])
def test_each_malicious_client_is_audited_and_the_honest_ones_finish_the_run(tmp_path, privacy, overrides):
    config = RunConfig.from_flat({"privacy": privacy, "num-rounds": 2, "out-dir": str(tmp_path), "seed": 3, **overrides})
    summary, _ = run_simulation(config, client_app=make_client_app(mods=[attacker]))
    run_dir = Path(summary["run_dir"])
    assert summary["rounds"] == 2 and summary["final_accuracy"] > 0.5  # the honest clients' model learns
    assert audit_verdict(run_dir, "--model", run_dir / f"model.{'he.' if privacy == 'he' else ''}safetensors").returncode == 0
    records = read(f"{run_dir}/audit.jsonl")
    for server_round in (1, 2):
        (end,) = [r["data"] for r in records if r["event"] == "round_end" and r["round"] == server_round]
        if privacy == "secagg":
            # each attacker dropped at the stage it lied in, and only there; 7 masked inputs were summed
            assert end["privacy"]["dropped"] == {stage: 1 for stage in STAGE_OF.values()}
            assert end["privacy"]["terms"] == 7
            (rejected,) = [r["data"] for r in records if r["event"] == "update_rejected" and r["round"] == server_round]
            assert rejected["partition"] == 2 and "masked vector" in rejected["reason"]
        elif privacy == "he-threshold":  # the attacker never joined the committee; the ceremony and rounds went on
            (ceremony,) = [r["data"] for r in records if r["event"] == "key_ceremony"]
            assert [m["partition"] for m in ceremony["members"]] == [1, 2, 3]
        else:
            assert [entry["node_id"] for entry in end["privacy"]["left_out"]] == [
                r["data"]["node_id"] for r in records
                if r["event"] == "update_accepted" and r["round"] == server_round and r["data"].get("partition") == 0
                and r["data"]["kind"] == "train"]
            assert end["privacy"]["terms"] == 3
