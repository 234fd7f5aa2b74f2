"""Grid wrappers: what the server adds around Flower's Grid without touching strategies.

- ``MeteredGrid`` counts what crosses the wire (payload bytes, replies, failures).
- ``PromptGrid`` collects replies as they arrive instead of at Flower's deployed pace.
- ``PartitionOrderedGrid`` lists nodes and replies in partition order, so that Flower's node
  sampling (``random.sample`` over ``get_node_ids()``) picks the same partitions for the same
  seed and aggregation adds updates in the same order, although Flower gives nodes random IDs
  in every run. In Flower's simulation runtime the partitions it gave its nodes are known
  (``RUNTIME_PARTITIONS``, which simulations.engine fills in); elsewhere each node is asked once.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from logging import WARNING
from typing import TypeVar

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedlearn.errors import FederationError
from fedlearn.messages import (
    NODE_RECORD,
    NUM_EXAMPLES_KEY,
    NUM_EXAMPLES_QUERY,
    PARTITION_KEY,
)
from fedlearn.updates import payload_bytes

T = TypeVar("T")

# node ID -> partition ID as the simulation runtime registered its nodes (empty when deployed):
# with it, 100,000 simulated nodes need no partition query each before round 1.
RUNTIME_PARTITIONS: dict[int, int] = {}


def short_reason(reason: str) -> str:
    """The message of a client error, without the remote traceback Flower wraps around it."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else reason
    return last.split("Message: ", 1)[-1].strip("'<>")


def parsed_replies(grid: Grid, messages: list[Message], timeout: float, record: str,
                   parse: Callable[[int, ConfigRecord, RecordDict], T], what: str) -> dict[int, T]:
    """Send one stage's requests of a privacy mode; ``parse(node, reply's ``record``, content)`` of
    each reply that came back without error from an addressee, by node. A reply it refuses
    (ValueError, KeyError, TypeError) counts as dropped, logged with ``what`` (mode, round, stage),
    so that one broken node cannot sink the stage."""
    addressees = {m.metadata.dst_node_id for m in messages}
    answered = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error() or node not in addressees:
            continue
        try:
            answered[node] = parse(node, reply.content.get(record, ConfigRecord()), reply.content)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            log(WARNING, "%s: node %d sent a malformed reply (%s); it counts as dropped", what, node, exc)
    return answered


def round_weight_cap(grid: Grid, nodes: list[int], counts: dict[int, int], config: dict, timeout: float) -> int:
    """The largest training-example count among ``nodes``, asking those not in ``counts`` (one
    signed NUM_EXAMPLES_QUERY each, which access control verifies and audits; answers are added
    to ``counts``): privacy modes that weight in ciphertext divide by it, so that sums cannot
    overflow. ``config`` is the run config (flat, with ``server-round``) the nodes need. An answer
    that is not a positive whole number is left out, as a node that did not answer."""
    unknown = [n for n in nodes if n not in counts]
    if unknown:
        queries = [Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=n, message_type=NUM_EXAMPLES_QUERY)
                   for n in unknown]
        for reply in grid.send_and_receive(queries, timeout=timeout):
            count = None if reply.has_error() else _count_of(reply.content)
            if count is not None:
                counts[reply.metadata.src_node_id] = count
    known = [counts[n] for n in nodes if n in counts]
    if not known:
        raise FederationError(
            f"none of the {len(nodes)} sampled nodes said how many training examples it holds within "
            f"round-timeout={timeout:g}s: are they running fedlearn's ClientApp?"
        )
    return max(known)


def _count_of(content: RecordDict) -> int | None:
    try:
        count = content[NODE_RECORD][NUM_EXAMPLES_KEY]
    except (KeyError, TypeError):
        return None
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def total_payload_bytes(messages: Iterable[Message]) -> int:
    """Sum of payload sizes, serializing each distinct record once: a strategy sends the same
    global model to every sampled node (secagg in per-node contents beside per-node shares), and
    a 1000-node round should not serialize it 1000 times just to count it. A RecordDict's
    serialized size is the sum of its entries' (one map entry each)."""
    sizes: dict[int, int] = {}
    total = 0
    for message in messages:
        for name, record in message.content.items():
            key = id(record)
            if key not in sizes:
                sizes[key] = payload_bytes(RecordDict({name: record}))
            total += sizes[key]
    return total


class GridWrapper(Grid):
    """Forwards everything to an inner Grid; subclasses override what they add."""

    def __init__(self, grid: Grid):
        self._grid = grid

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class PromptGrid(GridWrapper):
    """Waits for replies polling every ``interval`` seconds. Flower's deployed Grid sleeps 3 s
    between pulls, so every exchange (secure aggregation has four a round) waited 1.5 s on
    average after its last reply had arrived. Not much faster than 0.5 s: each pull costs the
    ServerApp and the SuperLink CPU that a small machine's ClientApps need (measured: polling
    every 0.1 s here, and the SuperExecs too, made a plain deployed round slower, not faster)."""

    def __init__(self, grid: Grid, interval: float = 0.5):
        super().__init__(grid)
        self.interval = interval

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self._grid.pull_messages(pending))
            replies += pulled
            pending -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies


@dataclass
class Traffic:
    bytes_down: int = 0  # server -> clients
    bytes_up: int = 0  # clients -> server
    replies: int = 0  # training replies with an update
    failures: int = 0  # training messages answered with an error or not at all in time
    errors: list[str] = field(default_factory=list)  # reasons given in error replies (any type)


class MeteredGrid(GridWrapper):
    """Adds up payload bytes of every exchange, and replies and failures of training ones."""

    def __init__(self, grid: Grid):
        super().__init__(grid)
        self._traffic = Traffic()

    def take_traffic(self) -> Traffic:
        """The traffic since the last call (one round, when called once per round)."""
        traffic, self._traffic = self._traffic, Traffic()
        return traffic

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        ok = [r for r in replies if not r.has_error()]
        self._traffic.bytes_down += total_payload_bytes(messages)
        self._traffic.bytes_up += total_payload_bytes(ok)
        self._traffic.errors += [r.error.reason for r in replies if r.has_error()]
        training = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if training:
            trained = sum(1 for r in ok if r.metadata.message_type == MessageType.TRAIN)
            self._traffic.replies += trained
            self._traffic.failures += len(training) - trained
        return replies


    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._traffic.bytes_down += total_payload_bytes(messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        ok = [r for r in replies if not r.has_error()]
        self._traffic.bytes_up += total_payload_bytes(ok)
        self._traffic.errors += [r.error.reason for r in replies if r.has_error()]
        self._traffic.replies += sum(1 for r in ok if r.metadata.message_type == MessageType.TRAIN)
        self._traffic.failures += sum(1 for r in replies if r.has_error())
        return replies


class PartitionOrderedGrid(GridWrapper):
    """Lists node IDs and replies by the partition each node reports; unknown nodes come last."""

    def __init__(self, grid: Grid):
        super().__init__(grid)
        self.partitions: dict[int, int] = {}
        self._discovery_timeout: float | None = None  # set once discover() ran: keep asking newcomers
        self._asked: set[int] = set()  # nodes asked once (one that did not answer is not asked again)
        self._listed: tuple[list[int], list[int]] = ([], [])  # the last node list and its partition order

    def wait_for_nodes(self, min_nodes: int, timeout: float, expected: int = 0, grace: float = 5.0) -> list[int]:
        """Connected node IDs once there are ``min_nodes``; a clear error after ``timeout``. With
        ``expected``, wait up to ``grace`` seconds more for that many (all partitions), so that a
        sampled subset is drawn from every node rather than from the first to connect."""
        deadline = time.monotonic() + timeout
        while len(nodes := list(self._grid.get_node_ids())) < min_nodes:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(nodes)} of the {min_nodes} nodes needed (min-available-clients) connected "
                    f"within {timeout:.0f} s: start more nodes or lower min-available-clients"
                )
            time.sleep(0.5)
        settle = time.monotonic() + grace
        while len(nodes) < expected and time.monotonic() < settle:
            time.sleep(0.1)
            nodes = list(self._grid.get_node_ids())
        return nodes

    def discover(self, nodes: Iterable[int], timeout: float) -> dict[int, int]:
        """The partition of each of ``nodes``: as the simulation runtime registered it, else asked
        (one QUERY message each)."""
        self._discovery_timeout = timeout
        nodes = list(nodes)
        self._asked.update(nodes)
        known = {n: RUNTIME_PARTITIONS[n] for n in nodes if n in RUNTIME_PARTITIONS}
        self.partitions.update(known)
        nodes = [n for n in nodes if n not in known]
        if not nodes:
            return self.partitions
        query = RecordDict({"config": ConfigRecord({"ask": PARTITION_KEY})})
        messages = [Message(query, dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            partition = _reported_partition(reply)
            if partition is not None:
                self.partitions[reply.metadata.src_node_id] = partition
        return self.partitions

    def _rank(self, node: int, reported: int | None = None) -> tuple[int, int]:
        partition = self.partitions.get(node, reported)
        return (partition if partition is not None else 1 << 62, node)

    def get_node_ids(self) -> Iterable[int]:
        """Connected nodes in partition order. Nodes that connected after discovery are asked
        first: Flower's simulation registers its nodes while the ServerApp already runs, so the
        first discovery may have seen only some, and sampling would then follow random node IDs."""
        nodes = list(self._grid.get_node_ids())
        if nodes == self._listed[0]:  # the same nodes as last time (every round, mostly): no re-sort
            return list(self._listed[1])
        newcomers = [n for n in nodes if n not in self._asked]
        if self._discovery_timeout is not None and newcomers:
            self.discover(newcomers, self._discovery_timeout)
        ordered = sorted(nodes, key=self._rank)
        if self._discovery_timeout is not None:  # ranks are final once every listed node was asked
            self._listed = (nodes, ordered)
        return list(ordered)  # a copy: callers (Flower's sampling) may change the list they get

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = self._grid.send_and_receive(messages, timeout=timeout)
        return sorted(replies, key=lambda r: self._rank(r.metadata.src_node_id, _reported_partition(r)))


@contextlib.contextmanager
def sampling_with(generator: random.Random) -> Iterator[None]:
    """Inside, Flower's strategies sample nodes with ``generator`` instead of the global `random`
    (their ``strategy_utils`` module is the one place they draw from it). Other threads of the
    process (Ray starting actors during round 1, in simulation) use the global one too, so a
    seeded global state did not always give the same sample."""
    from flwr.serverapp.strategy import strategy_utils

    own = strategy_utils.random
    strategy_utils.random = generator
    try:
        yield
    finally:
        strategy_utils.random = own


def _reported_partition(reply: Message) -> int | None:
    if reply.has_error() or NODE_RECORD not in reply.content:
        return None
    value = reply.content[NODE_RECORD].get(PARTITION_KEY)
    return int(value) if value is not None else None


class DropoutGrid(GridWrapper):
    """Fault injection (dropout-rate, dropout-stage): in each round, when the stage's first
    message goes out, a seeded choice of ``rate`` of its addressees vanish: from then on they
    get no message and send no reply until the round ends. The same partitions drop for the
    same seed and round, in every privacy mode."""

    def __init__(self, grid: Grid, rate: float, message_type: str, seed: int, partitions: dict[int, int]):
        super().__init__(grid)
        self.rate, self.message_type, self.seed, self.partitions = rate, message_type, seed, partitions
        self._round: int | None = None
        self._gone: set[int] = set()
        self.dropped: dict[int, list[int]] = {}  # round -> node ids that vanished (for tests and records)

    def _doom(self, server_round: int, nodes: list[int]) -> None:
        ranked = sorted(nodes, key=lambda n: (self.partitions.get(n, 1 << 62), n))
        count = int(self.rate * len(ranked) + 0.5)
        self._gone = set(random.Random(f"dropout/{self.seed}/{server_round}").sample(ranked, count))
        self.dropped[server_round] = sorted(self._gone)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        server_round = _server_round(messages)
        if server_round is None:
            return self._grid.send_and_receive(messages, timeout=timeout)
        if server_round != self._round:
            self._round, self._gone = server_round, set()
        if server_round not in self.dropped and any(m.metadata.message_type == self.message_type for m in messages):
            self._doom(server_round, [m.metadata.dst_node_id for m in messages])
        kept = [m for m in messages if m.metadata.dst_node_id not in self._gone]
        return self._grid.send_and_receive(kept, timeout=timeout) if kept else []


def _server_round(messages: list[Message]) -> int | None:
    for message in messages:
        if "config" in message.content and "server-round" in message.content["config"]:
            return int(message.content["config"]["server-round"])
    return None
