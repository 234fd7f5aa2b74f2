"""FedBuff (Nguyen et al. 2022): asynchronous buffered aggregation, so slow clients never hold
up a round.

Flower's round loop waits for every sampled client before it aggregates. FedBuff instead keeps
clients busy: a client that replies gets the current model back at once (or, if the model has
not changed since it was sent, as soon as it does); its update (the change from the model it
was sent) goes into a buffer, weighted by its examples and discounted
by its staleness (how many server updates happened since it was sent): ``(1 + s) ** -a`` with
``a = staleness-exponent``. When ``buffer-size`` updates are in, the server applies their
weighted mean (times ``server-lr``) and that is one "round": ``num-rounds`` counts server
updates. It talks to the nodes through the Grid's own push and pull, so access control, metering
and the audit log see every message as they do in synchronous rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.result import Result

from fedlearn.errors import RoundFailed
from fedlearn.fedavg import FedAvgFamily

POLL_SECONDS = 0.05


def staleness_weight(staleness: int, exponent: float) -> float:
    return float((1 + staleness) ** -exponent)


class FedBuff(FedAvg):
    """FedAvg's weighting and metrics, FedBuff's asynchronous loop. ``staleness[round]`` lists
    the staleness of the updates that made each server update."""

    def __init__(self, buffer_size: int, staleness_exponent: float, server_lr: float, **kwargs):
        super().__init__(**kwargs)
        self.buffer_size, self.staleness_exponent, self.server_lr = buffer_size, staleness_exponent, server_lr
        self.staleness: dict[int, list[int]] = {}

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> FedBuff: buffer %d, staleness exponent %g", self.buffer_size, self.staleness_exponent)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        result = Result()
        train_config = train_config or ConfigRecord()
        if evaluate_fn:
            evaluate_fn(0, initial_arrays)
        version, current = 0, initial_arrays
        sent_models = {0: _numpy(initial_arrays)}  # the models still in flight, by version
        in_flight: dict[str, tuple[int, int, float]] = {}  # message id -> (node, version sent, when)

        def dispatch(nodes: list[int]) -> None:
            config = ConfigRecord({**dict(train_config), "server-round": version + 1})
            messages = [Message(RecordDict({self.arrayrecord_key: current, self.configrecord_key: config}),
                                dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
            grid.push_messages(messages)
            for message, node in zip(messages, nodes):
                in_flight[message.metadata.message_id] = (node, version, time.monotonic())

        nodes = self._sample(grid)
        dispatch(nodes)
        progress = time.monotonic()
        buffer: list[tuple[dict[str, np.ndarray], float, int, RecordDict]] = []
        # Nodes done with the current model wait for the next one: the same model, round and seed
        # would only give the same update again.
        waiting: list[int] = []
        while version < num_rounds:
            replies = list(grid.pull_messages(list(in_flight)))
            now = time.monotonic()
            expired = [mid for mid, (_, _, sent) in in_flight.items() if now - sent > timeout]
            for mid in expired:  # a node that never answers is dropped; the others carry on
                in_flight.pop(mid)
            back: list[int] = []  # nodes done with an older model than the current: train again at once
            for reply in replies:
                sent = in_flight.pop(reply.metadata.reply_to_message_id, None)
                if sent is None:  # the answer to a request given up on
                    continue
                node, sent_version, _ = sent
                (back if sent_version < version else waiting).append(node)
                if reply.has_error():
                    continue
                progress = now
                local = _numpy(reply.content[self.arrayrecord_key])
                delta = {k: local[k] - sent_models[sent_version][k] for k in local}
                examples = float(reply.content["metrics"][self.weighted_by_key])
                buffer.append((delta, examples, version - sent_version, reply.content))
            if len(buffer) >= self.buffer_size:
                current = self._apply(current, buffer[: self.buffer_size], version + 1, result)
                buffer = buffer[self.buffer_size :]
                version += 1
                sent_models[version] = _numpy(current)
                back, waiting = back + waiting, []  # a new model for those who waited for one
                if evaluate_fn:
                    evaluate_fn(version, current)
            if back and version < num_rounds:
                dispatch(back)
            live = {v for _, v, _ in in_flight.values()} | {version}
            sent_models = {v: m for v, m in sent_models.items() if v in live}
            if now - progress > timeout:
                raise RoundFailed(
                    f"fedbuff: no client update for round-timeout={timeout:g}s before server update {version + 1} "
                    f"({len(in_flight)} requests still out); the rounds so far are kept"
                )
            if not replies:
                time.sleep(POLL_SECONDS)
        result.arrays = current
        return result

    def _sample(self, grid: Grid) -> list[int]:
        """Every connected node trains concurrently (fraction-train of them at the most)."""
        nodes = list(grid.get_node_ids())
        return nodes[: max(self.min_train_nodes, int(len(nodes) * self.fraction_train))]

    def _apply(self, current: ArrayRecord, updates: list, server_round: int, result: Result) -> ArrayRecord:
        weights = [examples * staleness_weight(stale, self.staleness_exponent) for _, examples, stale, _ in updates]
        total = sum(weights)
        model = _numpy(current)
        for name in model:
            step = sum(w * delta[name] for (delta, _, _, _), w in zip(updates, weights)) / total
            model[name] = (model[name] + self.server_lr * step).astype(model[name].dtype)
        self.staleness[server_round] = [stale for _, _, stale, _ in updates]
        metrics = self.train_metrics_aggr_fn([content for *_, content in updates], self.weighted_by_key)
        result.train_metrics_clientapp[server_round] = metrics
        return ArrayRecord({name: Array(value) for name, value in model.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


class FedBuffFamily(FedAvgFamily):
    """FedBuff's server loop; its clients train as FedAvg's do."""

    def build(self, config, **common) -> FedBuff:
        return FedBuff(buffer_size=config.buffer_count(), staleness_exponent=config.staleness_exponent,
                       server_lr=config.server_lr, **common)

    def round_facts(self, config, strategy: FedBuff, server_round: int) -> tuple[dict, dict]:
        """The staleness of each update of this server update."""
        return {"staleness": strategy.staleness.get(server_round, [])}, {}


def config_problems(config) -> list[str]:
    problems = []
    if not 0 <= config.buffer_size <= config.num_clients:
        problems.append(f"buffer-size={config.buffer_size}: must be between 1 and num-clients={config.num_clients}, or 0 for half")
    if config.staleness_exponent < 0:
        problems.append(f"staleness-exponent={config.staleness_exponent}: must be >= 0 (0 = stale updates count fully)")
    if config.dropout_rate > 0:
        problems.append(
            "dropout-rate injects dropouts into synchronous rounds; strategy=fedbuff has none "
            "(simulate slow clients with slow-fraction and slow-seconds)"
        )
    return problems
