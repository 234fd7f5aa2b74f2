"""Count what crosses the wire: a Grid wrapper that meters every message's payload."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid


def payload_bytes(content: RecordDict) -> int:
    """Serialized size of a message's records (what Flower puts on the wire, minus headers)."""
    return recorddict_to_proto(content).ByteSize()


class MeteredGrid(Grid):
    """Delegates to a real Grid and adds up payload bytes, replies and failures per round."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.reset()

    def reset(self) -> tuple[int, int, int, int]:
        """Return (bytes_down, bytes_up, replies, failures) since the last reset, and zero them."""
        counts = getattr(self, "_counts", (0, 0, 0, 0))
        self._counts = (0, 0, 0, 0)
        return counts

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        down = sum(payload_bytes(m.content) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        ok = [r for r in replies if not r.has_error()]
        up = sum(payload_bytes(r.content) for r in ok)
        failures = len(messages) - len(ok)
        d, u, n, f = self._counts
        self._counts = (d + down, u + up, n + len(ok), f + failures)
        return replies

    # Plain delegation for everything else.
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)
