"""ThresholdStrategy's checks on training replies, without a running Flower: every malformed
encrypted update is refused with the reason (access control then audits it as rejected)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from crypto import threshold
from fedlearn import he
from fedlearn.config import RunConfig
from fedlearn.errors import FederationError
from fedlearn.threshold import RECORD, Committee, RoundPlan
from server.threshold import ThresholdStrategy
from tests.helpers import needs_openfhe

needs_openfhe()

TEMPLATE = {"w": np.zeros((3, 3000), dtype=np.float32), "b": np.zeros(5, dtype=np.float32)}  # 9005 values: 3 ciphertexts


@pytest.fixture(scope="module")
def strategy():
    context = threshold.new_context()
    share = threshold.make_share(context, 0, None)
    ours = ThresholdStrategy(FedAvg(), RunConfig.from_flat({"privacy": "he-threshold"}), TEMPLATE)
    ours.committee = Committee("c", context, share.public, (1,), (0,), 2, (b"",))
    ours.plan = RoundPlan(value_bits=25, max_terms=10, weight_cap=100, exponents=(0, 0))
    return ours


def reply(strategy, *, examples=50, weight=0.5, values=9005, blobs=None, record=True) -> RecordDict:
    committee = strategy.committee
    blobs = blobs if blobs is not None else threshold.encrypt(committee.context, committee.joint_public, np.zeros(values, dtype=np.int64))
    content = RecordDict({"arrays": he.encrypted_record(blobs), "metrics": MetricRecord({"num-examples": examples})})
    if record:
        content[RECORD] = ConfigRecord({"weight": weight, "clipped": 0})
    return content


def test_a_well_formed_update_passes(strategy):
    strategy.check_reply(reply(strategy))


@pytest.mark.parametrize("change, reason", [
    ({"record": False}, "is the node in privacy=he-threshold"),
    ({"weight": 0.7}, "weight 0.7 is not num-examples 50 / weight cap 100"),
    ({"examples": 500, "weight": 5.0}, "weight 5 is not num-examples 500"),
    ({"values": 4000}, "1 ciphertexts, 3 expected for 9005 values"),
    ({"blobs": [b"\x00" * 1000] * 3}, "not a serialized OpenFHE ciphertext"),
])
def test_a_malformed_update_is_refused_with_the_reason(strategy, change, reason):
    with pytest.raises(ValueError, match=reason):
        strategy.check_reply(reply(strategy, **change))


class SilentGrid:
    """Three connected nodes that answer nothing (not keyholders, or not fedlearn's ClientApp)."""

    def get_node_ids(self):
        return [11, 12, 13]

    def send_and_receive(self, messages, *, timeout=None):
        return []


def test_a_ceremony_without_enough_keyholders_stops_with_the_fix(run_identity):
    ours = ThresholdStrategy(FedAvg(), RunConfig.from_flat({"privacy": "he-threshold"}), TEMPLATE)
    with pytest.raises(FederationError, match=r"committee of threshold-committee=3 key holders, but 0 of the 3 connected"):
        ours.hold_ceremony(SilentGrid())
    with pytest.raises(RuntimeError, match="hold_ceremony"):
        ours.configure_train(1, None, None, SilentGrid())  # no round before the ceremony


LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")  # an X25519 point of order 8


class CeremonyGrid:
    """Four keyholder nodes answering the ceremony with fedlearn's client code; node 11 (the
    lowest partition, first in line for the committee) advertises a low-order agreement key."""

    def __init__(self):
        self.states = {node: RecordDict() for node in (11, 12, 13, 14)}

    def get_node_ids(self):
        return list(self.states)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        from clients import threshold as client
        from fedlearn.messages import NODE_RECORD, PARTITION_KEY
        from fedlearn.threshold import HOLD, JOIN, KEYGEN

        answer = {JOIN: client.join, KEYGEN: client.keygen, HOLD: client.hold}
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            try:
                records = answer[msg.metadata.message_type](msg, self.states[node])
            except ValueError as exc:  # as Flower does with a ClientApp's exception: an error reply
                replies.append(Message(Error(code=0, reason=str(exc)), reply_to=msg))
                continue
            if msg.metadata.message_type == JOIN and node == 11:
                records[RECORD]["agreement-key"] = LOW_ORDER
            records[NODE_RECORD] = ConfigRecord({PARTITION_KEY: node - 11})
            replies.append(Message(RecordDict(records), reply_to=msg))
        return replies


def test_a_low_order_agreement_key_keeps_its_node_off_the_committee_not_the_ceremony_from_finishing(run_identity):
    """Issue 22: failed before: the server took any 32 bytes as a candidate's agreement key, so a
    node advertising a low-order point joined the committee, the next member's agreement with it
    raised, and the ceremony (the whole run) stopped."""
    ours = ThresholdStrategy(FedAvg(), RunConfig.from_flat({"privacy": "he-threshold", "num-clients": 4}), TEMPLATE)
    committee = ours.hold_ceremony(CeremonyGrid())
    assert committee.nodes == (12, 13, 14)


def test_openfhe_blobs_over_their_size_are_refused_unread():
    """Issue 22: failed before: OpenFHE parsed a blob of any size (a valid ciphertext with 200 KB
    appended loaded as if nothing followed), and a context of any parameters."""
    context = threshold.new_context()
    share = threshold.make_share(context, 0, None)
    (ciphertext,) = threshold.encrypt(context, share.public, np.arange(10))
    with pytest.raises(threshold.ThresholdError, match="more than the .* one can take: refused unread"):
        threshold.check_ciphertexts(context, [ciphertext + b"\0" * 200_000], 10)
    with pytest.raises(threshold.ThresholdError, match="crypto context of .* bytes, more than"):
        threshold.check_ciphertexts(context + b"\0" * 5000, [ciphertext], 10)
    threshold.check_ciphertexts(context, [ciphertext], 10)  # as made: accepted
