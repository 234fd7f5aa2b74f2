"""Strategies by name. We configure Flower's own implementations and do not rewrite them; ours
(fedlearn.ifca) build on Flower's FedAvg for what Flower lacks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import strategy as fl

import torch

from fedlearn import distillation, models, multimodel, privacy
from fedlearn.config import DISTILLATION_STRATEGIES, MULTIMODEL_STRATEGIES, RunConfig
from fedlearn.fedbuff import FedBuff
from fedlearn.ifca import IFCA
from fedlearn.multimodel import MultiModel

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]


def _specific(config: RunConfig) -> dict[str, Any]:
    """Strategy-specific constructor arguments from the run config."""
    return {
        "fedavg": {},
        "fedavgm": {"server_learning_rate": config.server_lr, "server_momentum": config.server_momentum},
        "fedprox": {"proximal_mu": config.proximal_mu},
        # Adaptive server optimizers (Reddi et al. 2021): eta is the server learning rate,
        # eta_l the clients' (only reported by Flower), tau the adaptivity.
        "fedadam": {"eta": config.server_lr, "eta_l": config.lr},
        "fedyogi": {"eta": config.server_lr, "eta_l": config.lr},
        "fedadagrad": {"eta": config.server_lr, "eta_l": config.lr},
        "fedmedian": {},
        "fedtrimmedavg": {"beta": config.trimmed_beta},
        "krum": {"num_malicious_nodes": config.krum_malicious},
        "ifca": {"clusters": config.cluster_count()},
        "fedper": {},
        "fedmd": {},
        "multimodel": {"names": config.model_names()},
        "fedbuff": {"buffer_size": config.buffer_count(), "staleness_exponent": config.staleness_exponent,
                    "server_lr": config.server_lr},
    }[config.strategy]


CLASSES = {
    "fedavg": fl.FedAvg,
    "fedavgm": fl.FedAvgM,
    "fedprox": fl.FedProx,
    "fedadam": fl.FedAdam,
    "fedyogi": fl.FedYogi,
    "fedadagrad": fl.FedAdagrad,
    "fedmedian": fl.FedMedian,
    "fedtrimmedavg": fl.FedTrimmedAvg,
    "krum": fl.Krum,
    "ifca": IFCA,  # ours: Flower has one global model per run
    # FedPer (Arivazhagan et al. 2019) is FedAvg on the shared layers: clients keep their head
    # (fedlearn.models.personal_names), so the server's model is the body alone.
    "fedper": fl.FedAvg,
    # FedMD (Li & Wang 2019) is FedAvg on the clients' class probabilities on a public set: each
    # client keeps its own model (fedlearn.distillation), the server's "model" is the consensus.
    "fedmd": fl.FedAvg,
    "multimodel": MultiModel,  # ours: several models, each averaged over the clients that trained it
    "fedbuff": FedBuff,  # ours: asynchronous buffered aggregation (Flower's round loop is synchronous)
}


def initial_state(config: RunConfig) -> dict[str, torch.Tensor]:
    """What server and clients exchange as the global state, at its start: the seeded model,
    without fedper's personal layers; fedmd's uniform consensus on the public set; multimodel's
    models, packed (ifca packs its clusters itself, see fedlearn.ifca)."""
    if config.strategy in DISTILLATION_STRATEGIES:
        return distillation.initial_consensus(config)
    if config.strategy in MULTIMODEL_STRATEGIES:
        return multimodel.initial_state(config)
    return models.shared_state(config, models.for_run(config))


def build(
    config: RunConfig,
    train_metrics_aggr_fn: MetricsAggregator | None = None,
    evaluate_metrics_aggr_fn: MetricsAggregator | None = None,
) -> fl.Strategy:
    """The Flower strategy for ``config.strategy``, sampling as the config says.

    Where the server never sees the aggregate (privacy=he) it only adds ciphertexts: every sum
    strategy is FedAvg's sampling and sum there (FedProx differs only on clients; FedAvgM's momentum is folded into what
    clients encrypt, see fedlearn.he), wrapped by server.he.HEStrategy."""
    name = config.strategy if privacy.get(config.privacy).sees_aggregate else "fedavg"
    fraction_evaluate = config.evaluation_fraction()
    return CLASSES[name](
        fraction_train=config.fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=config.min_available_clients,
        min_evaluate_nodes=config.min_available_clients if fraction_evaluate > 0 else 0,
        min_available_nodes=config.min_available_clients,
        train_metrics_aggr_fn=train_metrics_aggr_fn,
        evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        **(_specific(config) if name == config.strategy else {}),
    )
