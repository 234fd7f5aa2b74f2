import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from server.metering import payload_bytes


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
    from server.metering import MeteredGrid
    from tests.messages import message

    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(100, dtype=np.float32))})})
    messages = [message(content, dst=i + 1) for i in range(5)]
    grid = MeteredGrid(EchoGrid())
    assert len(list(grid.send_and_receive(messages, timeout=1))) == 3
    traffic = grid.take_traffic()
    size = payload_bytes(content)
    assert (traffic.bytes_down, traffic.bytes_up, traffic.replies, traffic.failures) == (5 * size, 3 * size, 3, 2)
    assert grid.take_traffic().bytes_down == 0
