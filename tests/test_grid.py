import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from server.grid import payload_bytes
from tests.helpers import message


def test_payload_bytes_track_array_size():
    small = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(10, dtype=np.float32))})})
    large = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(10_000, dtype=np.float32))})})
    assert 40 < payload_bytes(small) < 400
    assert 40_000 <= payload_bytes(large) < 41_000
    with_config = RecordDict({"arrays": large["arrays"], "config": ConfigRecord({"lr": 0.1})})
    assert payload_bytes(with_config) > payload_bytes(large)


class EchoGrid:
    """Replies to every other message with its content; the rest get no reply (a timeout)."""

    def send_and_receive(self, messages, *, timeout=None):
        return [m for i, m in enumerate(messages) if i % 2 == 0]


def test_metered_grid_counts_each_way_and_resets():
    from server.grid import MeteredGrid
    from tests.helpers import message

    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(100, dtype=np.float32))})})
    messages = [message(content, dst=i + 1) for i in range(5)]
    grid = MeteredGrid(EchoGrid())
    assert len(list(grid.send_and_receive(messages, timeout=1))) == 3
    traffic = grid.take_traffic()
    size = payload_bytes(content)
    assert (traffic.bytes_down, traffic.bytes_up, traffic.replies, traffic.failures) == (5 * size, 3 * size, 3, 2)
    assert grid.take_traffic().bytes_down == 0


class PartitionStubGrid:
    """Nodes 901, 17, 500 hold partitions 2, 0, 1; node 33 joins later and never answered."""

    def __init__(self):
        self.nodes = [901, 17, 500]
        self.partitions = {901: 2, 17: 0, 500: 1}
        self.sent = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import ConfigRecord

        from tests.helpers import message

        self.sent.extend(messages)
        return [
            message(RecordDict({"node": ConfigRecord({"partition-id": self.partitions[m.metadata.dst_node_id]})}),
                    src=m.metadata.dst_node_id, dst=0)
            for m in reversed(messages)  # replies arrive in any order
        ]


def test_partition_ordered_grid_lists_nodes_by_partition(monkeypatch):
    from flwr.app import MessageType

    from server import grid as grid_module
    from tests.helpers import message

    # Messages built inside discover() need a run id, which a running ServerApp provides.
    monkeypatch.setattr(grid_module, "Message", lambda content, dst_node_id, message_type: message(
        content, dst=dst_node_id, message_type=message_type))
    stub = PartitionStubGrid()
    ordered = grid_module.PartitionOrderedGrid(stub)
    assert ordered.discover(ordered.wait_for_nodes(min_nodes=3, timeout=5), timeout=5) == {17: 0, 500: 1, 901: 2}
    assert all(m.metadata.message_type == MessageType.QUERY for m in stub.sent)
    # A node that connects after discovery (Flower's simulation registers nodes while the
    # ServerApp runs) is asked for its partition before the next listing, once.
    stub.nodes.append(33)
    stub.partitions[33] = 5
    asked = len(stub.sent)
    assert list(ordered.get_node_ids()) == [17, 500, 901, 33]
    assert [m.metadata.dst_node_id for m in stub.sent[asked:]] == [33] and ordered.partitions[33] == 5
    list(ordered.get_node_ids())
    assert len(stub.sent) == asked + 1
    # Replies come back in partition order too, so aggregation adds them in a fixed order.
    replies = ordered.send_and_receive([message(RecordDict(), dst=n) for n in (901, 33, 17, 500)])
    assert [r.metadata.src_node_id for r in replies] == [17, 500, 901, 33]


def test_waiting_for_nodes_times_out_with_a_clear_message():
    import pytest

    from fedlearn.errors import FederationError
    from server.grid import PartitionOrderedGrid

    with pytest.raises(FederationError, match="only 3 of the 5 nodes needed .* connected within 0 s"):
        PartitionOrderedGrid(PartitionStubGrid()).wait_for_nodes(min_nodes=5, timeout=0.2)



def test_total_payload_bytes_counts_shared_and_distinct_contents():
    from server.grid import total_payload_bytes
    from tests.helpers import message

    small = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(10, dtype=np.float32))})})
    large = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(1000, dtype=np.float32))})})
    messages = [message(small, dst=1), message(large, dst=2), message(small, dst=3)]
    assert total_payload_bytes(messages) == 2 * payload_bytes(small) + payload_bytes(large)


def test_total_payload_bytes_of_per_node_contents_sharing_the_model():
    """secagg sends each node its own content around the same model record: the model is
    serialized once, and the total equals what each whole content would measure."""
    from server.grid import total_payload_bytes
    from tests.helpers import message

    model = ArrayRecord({"w": Array(np.zeros(1000, dtype=np.float32))})
    contents = [RecordDict({"arrays": model, "secagg": ConfigRecord({"sealed": [bytes(40 + i)]})}) for i in range(3)]
    assert total_payload_bytes([message(c, dst=i) for i, c in enumerate(contents)]) == sum(payload_bytes(c) for c in contents)


def test_dropout_grid_drops_the_same_seeded_nodes_from_their_stage_to_the_end_of_the_round():
    from server.grid import DropoutGrid
    from tests.helpers import message

    def stage(kind, nodes, server_round=1):
        content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
        return [message(content, dst=n, message_type=kind) for n in nodes]

    class Everyone:
        def send_and_receive(self, messages, *, timeout=None):
            return list(messages)

    partitions = {10 + p: p for p in range(10)}
    runs = []
    for _ in range(2):
        grid = DropoutGrid(Everyone(), 0.3, "train.secagg_share", seed=5, partitions=partitions)
        assert len(grid.send_and_receive(stage("train.secagg_advertise", partitions))) == 10  # before the stage
        assert len(grid.send_and_receive(stage("train.secagg_share", partitions))) == 7
        gone = set(grid.dropped[1])
        later = grid.send_and_receive(stage("train", partitions))
        assert len(gone) == 3 and not gone & {r.metadata.dst_node_id for r in later}
        assert len(grid.send_and_receive(stage("train.secagg_advertise", partitions, server_round=2))) == 10
        runs.append(gone)
    assert runs[0] == runs[1]  # seeded: the same nodes vanish for the same seed and round


class SlowLink:
    """A SuperLink whose replies arrive ``delays`` seconds after their requests were pushed (None: never)."""

    def __init__(self, delays):
        self.delays, self.pulls = delays, 0

    def push_messages(self, messages):
        self.pushed = time.monotonic()
        self.ids = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.ids)

    def pull_messages(self, message_ids):
        self.pulls += 1
        waited = time.monotonic() - self.pushed
        return [message(RecordDict(), src=1, dst=0, reply_to=i)
                for i, delay in zip(self.ids, self.delays) if i in message_ids and delay is not None and waited >= delay]


def test_prompt_grid_returns_as_soon_as_the_last_reply_is_in_and_stops_at_the_timeout():
    from server.grid import PromptGrid

    requests = [message(RecordDict(), dst=n) for n in (1, 2, 3)]
    started = time.monotonic()
    replies = list(PromptGrid(SlowLink([0.0, 0.3, 0.5]), interval=0.05).send_and_receive(requests, timeout=10))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert time.monotonic() - started < 1.0  # Flower's deployed Grid would pull again only after 3 s

    link = SlowLink([0.0, None, 0.1])
    started = time.monotonic()
    replies = list(PromptGrid(link, interval=0.05).send_and_receive(requests, timeout=0.6))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m2"]  # each reply once
    assert 0.6 <= time.monotonic() - started < 1.5 and link.pulls >= 3
