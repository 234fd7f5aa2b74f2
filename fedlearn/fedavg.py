"""The FedAvg family: Flower's own strategies (FedAvg, FedAvgM, FedProx, the adaptive server
optimizers, the robust aggregators), one global model that every client trains and tests.

``FedAvgFamily`` is also the base of every family: its methods are the hooks the server
(server.run, server.recorder) and the ClientApp (clients.app) call, and a family of our own
(fedlearn.ifca, fedper, distillation, multimodel, fedbuff) overrides the ones it does
differently. We configure Flower's implementations here and do not rewrite them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import strategy as fl

from fedlearn import data, models
from fedlearn.families import ClientRound, LocalUpdate
from fedlearn.training import evaluate, select_device
from fedlearn.updates import check_plain_update

UpdateCheck = Callable[[RecordDict], None]  # raises fedlearn.updates.Rejected (or ValueError) for a bad update

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
}


def _arguments(config) -> dict[str, Any]:
    """Each Flower strategy's own constructor arguments from the run config."""
    return {
        "fedavgm": {"server_learning_rate": config.server_lr, "server_momentum": config.server_momentum},
        "fedprox": {"proximal_mu": config.proximal_mu},
        # Adaptive server optimizers (Reddi et al. 2021): eta is the server learning rate,
        # eta_l the clients' (only reported by Flower), tau the adaptivity.
        "fedadam": {"eta": config.server_lr, "eta_l": config.lr},
        "fedyogi": {"eta": config.server_lr, "eta_l": config.lr},
        "fedadagrad": {"eta": config.server_lr, "eta_l": config.lr},
        "fedtrimmedavg": {"beta": config.trimmed_beta},
        "krum": {"num_malicious_nodes": config.krum_malicious},
    }.get(config.strategy, {})


def tensors(arrays: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def detached(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


class FedAvgFamily:
    """The hooks of a strategy family, as Flower's own strategies need them."""

    # -- server half -------------------------------------------------------------
    def build(self, config, **common) -> fl.Strategy:
        """The Flower strategy (FedAvg for a family that does not say); ``common`` holds the sampling and
        metric arguments every strategy takes."""
        return CLASSES.get(config.strategy, fl.FedAvg)(**common, **_arguments(config))

    def template(self, config) -> dict[str, torch.Tensor]:
        """What a client's update holds (names, shapes, dtypes), at its seeded start."""
        return models.shared_state(config, models.for_run(config))

    def initial_arrays(self, config, template: dict) -> ArrayRecord:
        """The global state round 1 starts from."""
        return ArrayRecord(template)

    def update_check(self, config, strategy: fl.Strategy, template: ArrayRecord) -> UpdateCheck:
        """How a clear update is checked before it reaches ``strategy`` (the innermost one)."""
        return lambda content: check_plain_update(content, template)

    def round_facts(self, config, strategy: fl.Strategy, server_round: int) -> tuple[dict, dict]:
        """What the strategy did this round: (for the round_end audit record, for the metrics row)."""
        return {}, {}

    def server_evaluate(self, config, arrays: ArrayRecord, model: torch.nn.Module, test, device) -> tuple[float, float, dict]:
        """(loss, accuracy, each model's accuracy where there are several) of the global state."""
        model.load_state_dict(arrays.to_torch_state_dict())
        return (*evaluate(model, test, device), {})

    def reported_per_model(self, config, client_metrics: dict[str, float]) -> dict[str, float]:
        """Each model's accuracy as the clients reported it, where there are several."""
        return {}

    def finish(self, config, store, strategy: fl.Strategy, final: ArrayRecord, sees_aggregate: bool) -> None:
        """Files of its own in the run directory, beside the saved global model."""

    # -- client half -------------------------------------------------------------
    def model(self, local: ClientRound) -> torch.nn.Module:
        """The global model the node received, ready to train or test."""
        model = models.for_run(local.config, seeded=False)
        models.load_shared(model, local.config, tensors(local.arrays))
        return model

    def client_update(self, local: ClientRound) -> LocalUpdate:
        model = self.model(local)
        result = local.train(model)
        return LocalUpdate(detached(models.shared_state(local.config, model)), result, {})

    def test_split(self, local: ClientRound) -> data.Split:
        return data.client_test_split(local.config, local.task.partition_id, local.config.num_clients)

    def client_evaluate(self, local: ClientRound) -> dict[str, float]:
        test = self.test_split(local)
        loss, accuracy = evaluate(self.model(local), test, select_device(local.config.device))
        return {"num-examples": len(test), "loss": loss, "accuracy": accuracy}


def fedprox_problems(config) -> list[str]:
    return [] if config.proximal_mu > 0 else ["strategy=fedprox needs proximal-mu > 0 (with 0 it is fedavg)"]


def krum_problems(config) -> list[str]:
    sampled = config.train_sample_size()
    if sampled > 2 * config.krum_malicious + 2:
        return []
    return [f"strategy=krum with krum-malicious={config.krum_malicious} needs more than "
            f"{2 * config.krum_malicious + 2} sampled clients per round, got {sampled}"]
