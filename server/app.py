"""Flower ServerApp: composes a strategy, centralized evaluation, grid wrappers and the run store.

The server is the authority on configuration: it validates the run config once and sends
the resolved keys to every client in each round's ConfigRecord, so clients behave the same
under ``flwr run``, ``fedlearn simulate`` and a real deployment.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from logging import INFO

import flwr
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedlearn import data, models, strategies
from fedlearn.config import RunConfig
from fedlearn.errors import RoundFailed
from fedlearn.runs import RoundRecord, RunStore
from fedlearn.training import evaluate, select_device
from server.grid import MeteredGrid, PartitionOrderedGrid

RoundCallback = Callable[[RoundRecord], None]


class _TargetReached(Exception):
    """Raised from the per-round hook to end a run early once target-accuracy is met."""


def log_round(record: RoundRecord) -> None:
    log(
        INFO,
        "fedlearn round %d: accuracy=%.4f loss=%.4f %.2fs up=%dB down=%dB clients=%d failures=%d",
        record.round,
        record.accuracy,
        record.loss,
        record.seconds,
        record.bytes_up,
        record.bytes_down,
        record.clients,
        record.failures,
    )


def short_reason(reason: str) -> str:
    """The message of a client error, without the remote traceback Flower wraps around it."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else reason
    return last.split("Message: ", 1)[-1].strip("'<>")


def global_model(config: RunConfig) -> torch.nn.Module:
    """The run's model at its seeded initial weights."""
    spec = data.spec(config.dataset)
    return models.build(config.model, spec.shape, spec.num_classes, seed=config.seed)


def initial_arrays(config: RunConfig) -> ArrayRecord:
    return ArrayRecord(global_model(config).state_dict())


def run_federation(
    grid: Grid, config: RunConfig, on_round: RoundCallback = log_round, run_id: str | None = None
) -> dict:
    """Run every round of ``config`` on ``grid`` and write the run directory. Returns the summary."""
    # Everything that can fail on bad input fails before the run directory exists.
    test = data.load(config.dataset, config.data_dir, config.test_fraction, config.seed).test
    device = select_device(config.device)
    model = global_model(config)  # evaluates every round's global weights on the test split
    ordered = PartitionOrderedGrid(grid)
    nodes = ordered.wait_for_nodes(config.min_available_clients, config.round_timeout)
    if config.fraction_train < 1 or 0 < config.fraction_evaluate < 1:
        # Sampling a subset: make it pick the same partitions for the same seed.
        ordered.discover(nodes, config.round_timeout)
    metered = MeteredGrid(ordered)
    random.seed(config.seed)  # Flower samples nodes with the global `random` module
    store = RunStore.create(config, run_id)
    client_metrics: dict[str, float] = {}  # this round's client-side metrics, for the round record

    def capture(prefix: str) -> strategies.MetricsAggregator:
        def aggregate(replies: list[RecordDict], weight_key: str) -> MetricRecord:
            metrics = aggregate_metricrecords(replies, weight_key)
            client_metrics.update({f"{prefix}_{k}": float(v) for k, v in metrics.items() if k != weight_key})
            return metrics

        return aggregate

    strategy = strategies.build(
        config, train_metrics_aggr_fn=capture("train"), evaluate_metrics_aggr_fn=capture("federated")
    )
    state = {"arrays": ArrayRecord(model.state_dict()), "clock": time.perf_counter()}
    started = state["clock"]

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state["arrays"] = arrays
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, test, device)
        now = time.perf_counter()
        traffic = metered.take_traffic()
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            seconds=round(now - state["clock"], 4),
            bytes_up=traffic.bytes_up,
            bytes_down=traffic.bytes_down,
            clients=traffic.replies,
            failures=traffic.failures,
            extra=dict(client_metrics),
        )
        client_metrics.clear()
        state["clock"] = now
        store.add_round(record)
        on_round(record)
        if server_round and traffic.replies == 0:
            first = (
                short_reason(traffic.errors[0])
                if traffic.errors
                else f"no reply within round-timeout={config.round_timeout:g}s"
            )
            raise RoundFailed(
                f"round {server_round}: no client update to aggregate ({traffic.failures} clients failed; "
                f"first error: {first}). The run stopped rather than continue with an unchanged model; "
                f"the rounds so far are in {store.directory}"
            )
        if server_round and config.target_accuracy and accuracy >= config.target_accuracy:
            raise _TargetReached
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    stopped_early = False
    try:
        strategy.start(
            grid=metered,
            initial_arrays=state["arrays"],
            num_rounds=config.num_rounds,
            timeout=config.round_timeout,
            train_config=ConfigRecord(config.to_flat()),
            evaluate_config=ConfigRecord(config.to_flat()),
            evaluate_fn=after_round,
        )
    except _TargetReached:
        stopped_early = True
    final = {k: v.numpy() for k, v in state["arrays"].to_torch_state_dict().items()}
    store.save_model(final)
    extra = {
        "run_dir": str(store.directory),
        "stopped_at_target": stopped_early,
        "parameters": int(sum(np.asarray(v).size for v in final.values())),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
    }
    return store.finish(time.perf_counter() - started, extra)


def make_server_app(
    config: RunConfig | None = None,
    on_round: RoundCallback = log_round,
    on_finish: Callable[[dict], None] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``config``; without one it reads Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        resolved = config or RunConfig.from_flat(context.run_config)
        summary = run_federation(grid, resolved, on_round)
        log(INFO, "fedlearn run finished: %s", summary["run_dir"])
        if on_finish:
            on_finish(summary)

    return app


# The App that `flwr run .` loads (see [tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
