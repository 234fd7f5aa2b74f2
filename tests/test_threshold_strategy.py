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
