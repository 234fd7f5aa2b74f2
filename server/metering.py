"""Count what crosses the wire: a Grid wrapper that meters every message's payload."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid


def payload_bytes(content: RecordDict) -> int:
    """Serialized size of a message's records (what Flower puts on the wire, minus headers)."""
    return recorddict_to_proto(content).ByteSize()


@dataclass
class Traffic:
    bytes_down: int = 0  # server -> clients
    bytes_up: int = 0  # clients -> server
    replies: int = 0  # replies with content
    failures: int = 0  # error replies and messages that got no reply in time


class MeteredGrid(Grid):
    """Delegates to a real Grid and adds up payload bytes, replies and failures."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self._traffic = Traffic()

    def take_traffic(self) -> Traffic:
        """The traffic since the last call (one round, when called once per round)."""
        traffic, self._traffic = self._traffic, Traffic()
        return traffic

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        ok = [r for r in replies if not r.has_error()]
        self._traffic.bytes_down += sum(payload_bytes(m.content) for m in messages)
        self._traffic.bytes_up += sum(payload_bytes(r.content) for r in ok)
        self._traffic.replies += len(ok)
        self._traffic.failures += len(messages) - len(ok)
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
