"""The run's Flower strategy and global state, from its strategy family (fedlearn.families)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy

from fedlearn import families, privacy
from fedlearn.config import RunConfig

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]


def initial_state(config: RunConfig) -> dict[str, torch.Tensor]:
    """What a client's update holds, at its seeded start: the model without fedper's personal
    layers, fedmd's uniform consensus on the public set, multimodel's models packed."""
    return families.halves(config.strategy).template(config)


def build(
    config: RunConfig,
    train_metrics_aggr_fn: MetricsAggregator | None = None,
    evaluate_metrics_aggr_fn: MetricsAggregator | None = None,
) -> Strategy:
    """The Flower strategy of ``config.strategy``'s family, sampling as the config says.

    Where the server never sees the aggregate (privacy=he) it only adds ciphertexts: every sum
    strategy is FedAvg's sampling and sum there (FedProx differs only on clients; FedAvgM's
    momentum is folded into what clients encrypt, see fedlearn.he), wrapped by server.he.HEStrategy."""
    fraction_evaluate = config.evaluation_fraction()
    common = dict(
        fraction_train=config.fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=config.min_available_clients,
        min_evaluate_nodes=config.min_available_clients if fraction_evaluate > 0 else 0,
        min_available_nodes=config.min_available_clients,
        train_metrics_aggr_fn=train_metrics_aggr_fn,
        evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
    )
    if not privacy.get(config.privacy).sees_aggregate:
        return FedAvg(**common)
    return families.halves(config.strategy).build(config, **common)
