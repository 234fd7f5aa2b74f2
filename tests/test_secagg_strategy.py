"""server.secagg.SecAggStrategy with the real client code for every stage, without a simulation:
the aggregate is the survivors' weighted average within the stated bound, a node whose stage
reply is malformed counts as dropped instead of sinking the round, and masked replies are
checked before they are added."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from clients import secagg as client
from fedlearn import strategies
from fedlearn.config import RunConfig
from fedlearn.messages import NODE_RECORD, NUM_EXAMPLES_KEY, SECAGG_RECORD
from fedlearn.secagg import ADVERTISE, CONSISTENCY, MASKED_ARRAY, SHARE, UNMASK
from server.app import global_model
from fedlearn.errors import RoundFailed
from server.secagg import SecAggStrategy

COUNTS = {1: 10, 2: 25, 3: 40, 4: 30}  # node id -> training examples
IDENTITIES = {node: Ed25519PrivateKey.generate() for node in COUNTS}  # the nodes' enrolled keys


class StageGrid:
    """Nodes answering the key stages with fedlearn's client code; ``broken`` sends a short key."""

    def __init__(self, config, broken=None, key=("c-public", b"short"), min_threshold=0, policy=None):
        self.config, self.broken, self.key, self.min_threshold, self.policy = config, broken, key, min_threshold, policy
        self.states = {node: RecordDict() for node in COUNTS}

    def get_node_ids(self):
        return list(COUNTS)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node, state, kind = msg.metadata.dst_node_id, self.states[msg.metadata.dst_node_id], msg.metadata.message_type
            if kind == ADVERTISE:
                records = client.advertise(msg, state, IDENTITIES[node])
                records[NODE_RECORD] = ConfigRecord({NUM_EXAMPLES_KEY: COUNTS[node]})
                if node == self.broken:
                    records[SECAGG_RECORD][self.key[0]] = self.key[1]
            else:
                try:
                    records = self.answer(msg, node, state, kind)
                except ValueError as exc:  # as Flower does with a ClientApp's exception: an error reply
                    replies.append(Message(Error(code=0, reason=str(exc)), reply_to=msg))
                    continue
            replies.append(Message(RecordDict(records), reply_to=msg))
        return replies

    def answer(self, msg, node, state, kind):
        if kind == SHARE:
            return client.share(msg, state, self.config, self.min_threshold, self.policy)
        if kind == CONSISTENCY:
            return client.sign_survivors(msg, state, IDENTITIES[node])
        if kind == UNMASK:
            return client.unmask(msg, state)
        raise AssertionError(f"unexpected {kind}")


def setup(**overrides):
    config = RunConfig.from_flat({"privacy": "secagg", "num-clients": len(COUNTS), "model": "logreg", **overrides})
    template = {k: v.detach().numpy() for k, v in global_model(config).state_dict().items()}
    return config, SecAggStrategy(strategies.build(config), config, template), template


def train_replies(grid, messages, template, rng):
    """Masked training replies from the real client code, and the clear models behind them."""
    replies, local = [], {}
    for msg in messages:
        node = msg.metadata.dst_node_id
        local[node] = {k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in template.items()}
        records = client.masked_update(msg, grid.states[node], local[node], COUNTS[node])
        replies.append(Message(RecordDict({"metrics": MetricRecord({"num-examples": COUNTS[node]}), **records}), reply_to=msg))
    return replies, local


def assert_weighted_average_of(local, aggregate, bound) -> dict[int, int]:
    """The aggregate is the example-weighted average of the ``local`` models within ``bound``."""
    weights = {node: COUNTS[node] for node in local}
    for name in local[next(iter(local))]:
        expected = sum(local[n][name].astype(np.float64) * w for n, w in weights.items()) / sum(weights.values())
        assert np.abs(aggregate[name].numpy() - expected).max() <= bound
    return weights


LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")  # order 8


@pytest.mark.parametrize("key", [
    ("c-public", b"short"),
    ("c-public", bytes(32)),  # the point at u=0: every agreement with it is all zeros
    ("c-public", LOW_ORDER),
    ("s-public", LOW_ORDER),
])
def test_a_malformed_advertisement_counts_as_a_dropout_and_the_others_are_averaged(run_identity, key):
    """Issue 22: the low-order keys failed before: the server took any 32 bytes, and every
    honest client's agreement with the attacker's key then raised, sinking the round."""
    config, strategy, template = setup()
    grid = StageGrid(config, broken=2, key=key)
    arrays = ArrayRecord({k: Array(v) for k, v in template.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(config.to_flat()), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 3, 4]
    assert strategy.dropped["advertise"] == [2]
    replies, local = train_replies(grid, messages, template, np.random.default_rng(0))
    for reply in replies:
        strategy.check_reply(reply.content)
    aggregate, _ = strategy.aggregate_train(1, replies)
    weights = assert_weighted_average_of(local, aggregate, strategy.last["error_bound"])
    assert strategy.last["total_weight"] == pytest.approx(sum(weights.values()) / max(weights.values()))
    assert strategy.last["terms"] == 3 and strategy.last["dropped"]["advertise"] == 1


class OversizedShares(StageGrid):
    """Node 2 seals an oversized blob for its first neighbour."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.message_type == SHARE and reply.metadata.src_node_id == 2:
                sealed = [bytes(b) for b in reply.content[SECAGG_RECORD]["sealed"]]
                reply.content[SECAGG_RECORD]["sealed"] = [sealed[0] + b"\0" * 1000, *sealed[1:]]
        return replies


def test_a_node_that_relays_a_sealed_share_of_the_wrong_size_is_dropped_not_its_receiver(run_identity):
    """Issue 22: failed before: the server relayed the blob, and its receiver failed to open it
    at unmask, so an honest node dropped (and with few nodes the round failed)."""
    config, strategy, template = setup()
    grid = OversizedShares(config)
    arrays = ArrayRecord({k: Array(v) for k, v in template.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(config.to_flat()), grid))
    assert strategy.dropped["share"] == [2] and sorted(m.metadata.dst_node_id for m in messages) == [1, 3, 4]
    replies, local = train_replies(grid, messages, template, np.random.default_rng(0))
    aggregate, _ = strategy.aggregate_train(1, replies)
    assert_weighted_average_of(local, aggregate, strategy.last["error_bound"])


class BadReveal(StageGrid):
    """Node 2 answers unmask with shares edited by ``edit(ids, kinds, shares)``."""

    def __init__(self, config, edit):
        super().__init__(config)
        self.edit = edit

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.message_type == UNMASK and reply.metadata.src_node_id == 2:
                record = reply.content[SECAGG_RECORD]
                ids, kinds, shares = self.edit([int(j) for j in record["ids"]], [str(k) for k in record["kinds"]],
                                               [bytes(x) for x in record["shares"]])
                reply.content[SECAGG_RECORD] = ConfigRecord({"ids": ids, "kinds": kinds, "shares": shares})
        return replies


@pytest.mark.parametrize("edit", [
    lambda ids, kinds, shares: (ids, ["s", *kinds[1:]], shares),  # the secret that must stay secret
    lambda ids, kinds, shares: (ids, kinds, [shares[0][:5], *shares[1:]]),  # short
    lambda ids, kinds, shares: (ids, kinds, [shares[0] + b"x" * 100, *shares[1:]]),  # oversized
    lambda ids, kinds, shares: (ids, kinds, [bytes([shares[0][0] % 4 + 1]) + shares[0][1:], *shares[1:]]),  # another index
    lambda ids, kinds, shares: (ids[:-1], kinds[:-1], shares[:-1]),  # one holder left out
    lambda ids, kinds, shares: ([*ids, 9], [*kinds, "b"], [*shares, shares[0]]),  # a node outside its holders
], ids=["wrong-kind", "short", "oversized", "wrong-index", "missing", "outsider"])
def test_a_bad_unmask_answer_drops_its_sender_and_the_others_unmask_the_sum(run_identity, edit):
    """Issue 22: failed before: the server passed every answer to unmask_sum, which refused the
    whole round (or combined a wrong secret) when one node revealed a share of the wrong kind,
    size or index, or for a node outside its holders."""
    config, strategy, template = setup()
    grid = BadReveal(config, edit)
    arrays = ArrayRecord({k: Array(v) for k, v in template.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(config.to_flat()), grid))
    replies, local = train_replies(grid, messages, template, np.random.default_rng(0))
    aggregate, _ = strategy.aggregate_train(1, replies)
    assert strategy.dropped["unmask"] == [2]
    assert_weighted_average_of(local, aggregate, strategy.last["error_bound"])


@pytest.mark.parametrize("tamper, reason", [
    (lambda c: c["arrays"].__setitem__(MASKED_ARRAY, Array(np.zeros(3, dtype=np.uint16))), "the round expects uint16"),
    (lambda c: c["arrays"].__setitem__(MASKED_ARRAY, Array(np.zeros(7850, dtype=np.float32))), "the round expects uint16"),
    (lambda c: c[SECAGG_RECORD].__setitem__("weight", 0.5), "is not num-examples"),
    (lambda c: c.__delitem__(SECAGG_RECORD), "not a masked update"),
    (lambda c: c["arrays"].__setitem__("extra", Array(np.zeros(1, dtype=np.uint16))), "holds only 'masked'"),
])
def test_malformed_masked_updates_are_refused_with_the_reason(run_identity, tamper, reason):
    config, strategy, template = setup()
    grid = StageGrid(config)
    arrays = ArrayRecord({k: Array(v) for k, v in template.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(config.to_flat()), grid))
    replies, _ = train_replies(grid, messages[:1], template, np.random.default_rng(0))
    content = replies[0].content
    strategy.check_reply(content)  # as sent: accepted
    tamper(content)
    with pytest.raises(ValueError, match=reason):
        strategy.check_reply(content)


@pytest.mark.parametrize("lie", [{"secagg-threshold": 2}, {"secagg-neighbours": 2, "num-clients": 8}])
def test_nodes_that_pin_a_threshold_refuse_a_server_that_lowers_it_or_shrinks_their_neighbourhood(run_identity, lie):
    """Issue 22 (the node's own policy): failed before: a node took its threshold floor from the
    config the server sends, so a server could lower secagg-threshold, or shrink the
    neighbourhoods, and collect both secrets of a client from fewer holders. Nodes pinning
    secagg-min-threshold=3 refuse to share, and the round stops instead."""
    config, strategy, template = setup(**lie)
    grid = StageGrid(config, min_threshold=3)
    arrays = ArrayRecord({k: Array(v) for k, v in template.items()})
    with pytest.raises(RoundFailed, match="by the share stage"):
        list(strategy.configure_train(1, arrays, ConfigRecord(config.to_flat()), grid))
    honest = StageGrid(setup()[0], min_threshold=3)  # the run's own strict majority of 4 is 3: accepted
    assert len(list(setup()[1].configure_train(1, arrays, ConfigRecord(honest.config.to_flat()), honest))) == 4


def policy_enrolling(nodes):
    from fedlearn.access import ROLES, AccessPolicy

    policy = AccessPolicy()
    for node in nodes:
        policy.enroll(f"node-{node}", IDENTITIES[node].public_key(), ROLES)
    return policy


def test_nodes_refuse_to_share_with_an_identity_their_policy_did_not_enroll(run_identity):
    """Issue 22 (signed advertisements against enrolled identities): failed before: a client
    took whatever public keys the server listed as its neighbours', so a server could stand in
    for a peer with keys of its own. Node 4's identity is not in the nodes' policy here (a
    stand-in): every node refuses to share and the round stops; with it enrolled, it runs."""
    config, strategy, template = setup()
    arrays = ArrayRecord({k: Array(v) for k, v in template.items()})
    grid = StageGrid(config, policy=policy_enrolling([1, 2, 3]))
    with pytest.raises(RoundFailed, match="by the share stage"):
        list(strategy.configure_train(1, arrays, ConfigRecord(config.to_flat()), grid))
    config, strategy, template = setup()
    grid = StageGrid(config, policy=policy_enrolling(COUNTS))
    assert len(list(strategy.configure_train(1, arrays, ConfigRecord(config.to_flat()), grid))) == 4


def test_the_server_drops_an_advertisement_under_another_identity_than_the_reply_was_signed_with():
    """Issue 22: failed before (advertisements named no identity): a node could advertise round
    keys for itself under another enrolled node's identity; the clients' own check that no
    identity advertises twice is the second line of defence."""
    from crypto import signing
    from crypto.secagg_protocol import ClientSession
    from fedlearn.messages import AUTH_RECORD
    from server.secagg import advertised_by_signer

    ad = ClientSession(1, 2, 16, 4, b"ctx").advertise(IDENTITIES[1])
    signed_by = lambda key: RecordDict({AUTH_RECORD: ConfigRecord({"key": signing.public_b64(key.public_key())})})
    assert advertised_by_signer(ad, signed_by(IDENTITIES[1])) is None
    assert "another identity" in advertised_by_signer(ad, signed_by(IDENTITIES[2]))
