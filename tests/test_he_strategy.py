"""server.he.HEStrategy with the real client code, without a simulation: FedAvgM folded into
encrypted contributions equals Flower's FedAvgM, and malformed encrypted updates are refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM

from clients.app import NodeTask, client_half
from clients.he import encrypted_update
from crypto.he import HEKey, generate_pair
from fedlearn import strategies
from fedlearn.families import ClientRound
from fedlearn.config import RunConfig
from fedlearn.messages import HE_RECORD, NODE_RECORD, NUM_EXAMPLES_KEY
from server.app import global_model
from server.he import HEStrategy

COUNTS = {1: 10, 2: 25, 3: 40}  # node id -> training examples


class CountingGrid:
    """Three nodes that answer the server's example-count query."""

    def get_node_ids(self):
        return list(COUNTS)

    def send_and_receive(self, messages, *, timeout=None):
        return [
            Message(RecordDict({NODE_RECORD: ConfigRecord({NUM_EXAMPLES_KEY: COUNTS[m.metadata.dst_node_id]})}), reply_to=m)
            for m in messages
        ]


def setup(tmp_path, **overrides):
    secret, public = generate_pair(tmp_path, overrides.pop("he-scheme", "bfv"), 3)
    key = HEKey.load(public, secret=False)
    config = RunConfig.from_flat({"privacy": "he", "num-clients": 3, "model": "logreg", "he-scheme": key.info.scheme,
                                  "he-public": str(public), "he-secret": str(secret), **overrides})
    template = {k: v.detach().numpy() for k, v in global_model(config).state_dict().items()}
    return config, HEStrategy(strategies.build(config), config, template), template


def received_model(msg, config, state) -> ClientRound:
    """What the ClientApp's round holds of the global state (decoded as it is: by the mode's client half)."""
    local = ClientRound(NodeTask(config, 1, 0, config.num_clients), state, 0, fit=None,
                        decode=lambda: client_half(config).decode(msg, config))
    local.arrays  # decode now
    return local


def client_replies(config, messages, server_round, rng):
    """What fedlearn's ClientApp sends back, with local training replaced by a random step."""
    replies, clear = [], []
    for msg in messages:
        node = msg.metadata.dst_node_id
        received = received_model(msg, config, RecordDict())
        local = {k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in received.arrays.items()}
        task = NodeTask(config, server_round, node, config.num_clients)
        metrics = MetricRecord({"num-examples": COUNTS[node]})
        records = encrypted_update(msg, task, received, local, COUNTS[node])
        replies.append(Message(RecordDict({"metrics": metrics, **records}), reply_to=msg))
        clear.append(Message(RecordDict({"metrics": metrics, "arrays": ArrayRecord({k: Array(v) for k, v in local.items()})}), reply_to=msg))
    return replies, clear, received.arrays


def test_fedavgm_folded_into_contributions_equals_flowers_fedavgm(tmp_path, run_identity):
    config, strategy, template = setup(tmp_path, **{"he-scheme": "ckks", "strategy": "fedavgm",
                                                    "server-lr": 0.7, "server-momentum": 0.5})
    flower = FedAvgM(server_learning_rate=0.7, server_momentum=0.5)
    grid = CountingGrid()
    encrypted = flowers = ArrayRecord({k: Array(v) for k, v in template.items()})
    train_config = ConfigRecord(config.to_flat())
    for server_round in (1, 2, 3, 4):
        messages = list(strategy.configure_train(server_round, encrypted, train_config, grid))
        flower.configure_train(server_round, flowers, ConfigRecord(), grid)  # keeps its current model
        replies, clear, seen = client_replies(config, messages, server_round, np.random.default_rng(server_round))
        if server_round > 1:  # what the clients decrypted is Flower's model of the round before
            assert max(np.abs(seen[k] - flowers[k].numpy()).max() for k in seen) < 1e-5
        for reply in replies:
            strategy.check_reply(reply.content)
        encrypted, _ = strategy.aggregate_train(server_round, replies)
        flowers, _ = flower.aggregate_train(server_round, clear)


def test_malformed_encrypted_updates_are_refused_with_the_reason(tmp_path, run_identity):
    config, strategy, template = setup(tmp_path)
    initial = ArrayRecord({k: Array(v) for k, v in template.items()})
    messages = list(strategy.configure_train(1, initial, ConfigRecord(config.to_flat()), CountingGrid()))
    replies, clear, _ = client_replies(config, messages, 1, np.random.default_rng(0))
    good = replies[0].content

    def altered(change):
        content = RecordDict(dict(good.items()))
        change(content)
        return content

    def weight(c):
        c[HE_RECORD] = ConfigRecord({**dict(c[HE_RECORD]), "weight": 0.999})

    def dropped(c):
        c["arrays"] = ArrayRecord({k: v for k, v in list(c["arrays"].items())[:-1]} or {"ct-00000": Array(np.zeros(1, np.uint8))})

    def garbage(c):
        c["arrays"] = ArrayRecord({k: Array(np.frombuffer(b"\x01" * 500, np.uint8)) for k in c["arrays"]})

    def ranges(c):
        c[HE_RECORD] = ConfigRecord({**dict(c[HE_RECORD]), "range-exp": [e + 1 for e in c[HE_RECORD]["range-exp"]]})

    cases = [
        (clear[0].content, "not an encrypted update"),
        (altered(weight), "is not num-examples"),
        (altered(garbage), "not a valid bfv ciphertext"),
    ]
    for content, reason in cases:
        with pytest.raises(ValueError, match=reason):
            strategy.check_reply(content)
    strategy.check_reply(good)
    strategy.check_reply(altered(ranges))  # other ranges alone are no fault: the majority decides (below)
    for exponents in ([10**6] * len(template), [0] * (len(template) + 1)):
        with pytest.raises(ValueError, match="range exponents for"):
            strategy.check_reply(altered(lambda c: c.__setitem__(HE_RECORD, ConfigRecord({**dict(c[HE_RECORD]), "range-exp": exponents}))))
    with pytest.raises(ValueError, match="ciphertexts instead|not a valid"):
        strategy.check_reply(altered(dropped))
    assert messages[0].metadata.message_type == MessageType.TRAIN


def test_a_client_claiming_other_ranges_first_is_left_out_not_the_honest_majority(tmp_path, run_identity):
    """Issue 22 (he range exponents): failed before: the first reply checked fixed the round's
    ranges, so a client that answered first with other ranges (it may claim any partition id to
    be ordered first) got every honest update refused and audited as malformed. Now the ranges
    most replies share are the round's, and the odd one is left out, named in round_end."""
    config, strategy, template = setup(tmp_path)
    initial = ArrayRecord({k: Array(v) for k, v in template.items()})
    messages = list(strategy.configure_train(1, initial, ConfigRecord(config.to_flat()), CountingGrid()))
    replies, _, _ = client_replies(config, messages, 1, np.random.default_rng(0))
    liar = replies[0]
    liar.content[HE_RECORD] = ConfigRecord({**dict(liar.content[HE_RECORD]),
                                            "range-exp": [e - 3 for e in liar.content[HE_RECORD]["range-exp"]]})
    for reply in replies:
        strategy.check_reply(reply.content)  # each is well formed on its own
    honest_ranges = tuple(replies[1].content[HE_RECORD]["range-exp"])
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.plan.exponents == honest_ranges
    assert strategy.last["terms"] == 2
    assert [entry["node_id"] for entry in strategy.last["left_out"]] == [liar.metadata.src_node_id]


def test_a_node_without_the_right_secret_context_fails_before_training(tmp_path, run_identity):
    from fedlearn.errors import ConfigError

    config, strategy, template = setup(tmp_path)
    initial = ArrayRecord({k: Array(v) for k, v in template.items()})
    (msg, *_) = list(strategy.configure_train(1, initial, ConfigRecord(config.to_flat()), CountingGrid()))
    with pytest.raises(ConfigError, match="no secret HE context: start it with --node-config 'he-secret=PATH'"):
        received_model(msg, config.replace(he_secret=""), RecordDict())
    other, _ = generate_pair(tmp_path / "other", "bfv", 3)
    with pytest.raises(ConfigError, match="belongs to another HE key pair"):
        received_model(msg, config.replace(he_secret=str(other)), RecordDict())
