"""Several models in one run (``strategy=multimodel``): different architectures trained by the
same clients, each with its own aggregate, metrics and saved file.

The models travel packed (fedlearn.packing, ``<model>/<array>``). Each round a client trains
``models-per-client`` of them, taken in turn by partition id and round so every model gets its
share of clients, and replies with those alone; the server averages each model over the clients
that trained it (Flower's FedAvg weighting) and keeps the others. With every client training
every model (``models-per-client=0``) the packed models are one weighted sum, so they run under
secagg and he, and each model follows exactly the trajectory of its own FedAvg run.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedlearn import models, packing
from fedlearn.data import Split
from fedlearn.families import ClientRound, LocalUpdate
from fedlearn.fedavg import FedAvgFamily, UpdateCheck, tensors
from fedlearn.updates import check_models_update
from fedlearn.training import TrainResult, check_finite, evaluate, select_device, train


def build_model(config, name: str, *, seeded: bool = True) -> torch.nn.Module:
    """Model ``name`` of the run, from the run's seed: the start its own FedAvg run would have."""
    return models.for_run(config, name=name, seeded=seeded)


def initial_state(config) -> dict[str, torch.Tensor]:
    return {f"{name}{packing.SEPARATOR}{k}": v for name in config.model_names()
            for k, v in build_model(config, name).state_dict().items()}


def assignment(config, partition_id: int, server_round: int) -> list[str]:
    """The models a client trains this round."""
    names = config.model_names()
    count = config.models_per_client or len(names)
    if count == len(names):
        return names
    first = (partition_id + server_round) % len(names)
    return [names[(first + i) % len(names)] for i in range(count)]


def load(config, state: dict[str, np.ndarray], name: str) -> torch.nn.Module:
    module = build_model(config, name, seeded=False)
    module.load_state_dict(tensors(state))
    return module


class MultiModel(FedAvg):
    """FedAvg's sampling and weighting, one average per model. ``trained[round]`` counts the
    clients that trained each model."""

    def __init__(self, names: list[str], **kwargs):
        super().__init__(**kwargs)
        self.names = names
        self.trained: dict[int, dict[str, int]] = {}
        self._current: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid or self._current is None:
            return None, None
        states = packing.unpack(self._current, self.names)
        counts = {}
        for name in self.names:
            contents = []
            for reply in valid:
                mine = {k: a for k, a in reply.content["arrays"].items() if k.startswith(name + packing.SEPARATOR)}
                if mine:
                    contents.append(RecordDict({"arrays": ArrayRecord(mine), "metrics": reply.content["metrics"]}))
            if contents:
                states[name] = packing.unpack(aggregate_arrayrecords(contents, self.weighted_by_key), [name])[name]
            counts[name] = len(contents)
        self.trained[server_round] = counts
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        return packing.pack(states), metrics


def train_models(config, arrays, split: Split, partition_id: int, server_round: int, seed: int) -> tuple[dict, TrainResult]:
    """A client's round: train its share of the run's models, each from the global one and with
    the seed a FedAvg run of that model alone would use. The packed trained models, and their
    mean training result."""
    states = packing.unpack(arrays, config.model_names())
    packed, results = {}, []
    for name in assignment(config, partition_id, server_round):
        module = load(config, states[name], name)
        results.append(train(module, split, config, server_round, seed=seed))
        check_finite(module.state_dict())
        packed.update({f"{name}{packing.SEPARATOR}{k}": v.detach().cpu() for k, v in module.state_dict().items()})
    mean = TrainResult(results[0].num_examples, float(np.mean([r.loss for r in results])),
                       float(np.mean([r.accuracy for r in results])), sum(r.steps for r in results))
    return packed, mean


def evaluate_models(config, arrays, test: Split) -> dict[str, float]:
    """Every model of the run on ``test``: the mean loss and accuracy, and each model's accuracy."""
    states = packing.unpack(arrays, config.model_names())
    device = select_device(config.device)
    results = {name: evaluate(load(config, states[name], name), test, device) for name in config.model_names()}
    metrics = {"num-examples": len(test), "loss": float(np.mean([loss for loss, _ in results.values()])),
               "accuracy": float(np.mean([acc for _, acc in results.values()]))}
    metrics.update({f"accuracy-{name}": acc for name, (_, acc) in results.items()})
    return metrics


class MultiModelFamily(FedAvgFamily):
    """Both halves of multimodel: the models travel packed; each client trains its share."""

    def build(self, config, **common) -> MultiModel:
        return MultiModel(names=config.model_names(), **common)

    def template(self, config) -> dict[str, torch.Tensor]:
        return initial_state(config)

    def update_check(self, config, strategy: MultiModel, template: ArrayRecord) -> UpdateCheck:
        """Whole models of the run, the ones the client trained."""
        return lambda content: check_models_update(content, template)

    def round_facts(self, config, strategy: MultiModel, server_round: int) -> tuple[dict, dict]:
        """Which client trained which model (under he the server runs plain FedAvg: every client trains all)."""
        if not isinstance(strategy, MultiModel):
            return {}, {}
        return {"trained": strategy.trained.get(server_round, {})}, {}

    def server_evaluate(self, config, arrays: ArrayRecord, model, test: Split, device) -> tuple[float, float, dict]:
        metrics = evaluate_models(config, arrays, test)
        return metrics["loss"], metrics["accuracy"], {name: metrics[f"accuracy-{name}"] for name in config.model_names()}

    def reported_per_model(self, config, client_metrics: dict[str, float]) -> dict[str, float]:
        return {name: client_metrics[f"federated_accuracy-{name}"] for name in config.model_names()
                if f"federated_accuracy-{name}" in client_metrics}

    def finish(self, config, store, strategy: MultiModel, final: ArrayRecord, sees_aggregate: bool) -> None:
        """Each model in a file of its own, too, where the server holds them in clear."""
        if sees_aggregate:
            for name, named in packing.unpack(final, config.model_names()).items():
                store.save_model(named, name=f"model-{name}.safetensors", metadata={"model": name})

    def client_update(self, local: ClientRound) -> LocalUpdate:
        task = local.task
        state, result = train_models(local.config, local.arrays, task.split, task.partition_id, task.server_round, local.seed)
        return LocalUpdate(state, result, {})

    def client_evaluate(self, local: ClientRound) -> dict[str, float]:
        return evaluate_models(local.config, local.arrays, self.test_split(local))


def config_problems(config) -> list[str]:
    """strategy=multimodel's own checks: two or more different models, and each client's share."""
    names = config.model_names()
    problems = models.set_problems(config)
    if len(names) < 2 or len(set(names)) != len(names):
        problems.append(
            f"strategy=multimodel needs models= two or more different architectures, got {config.models!r} "
            "(each model is named by its architecture, so each can appear once)"
        )
    from fedlearn import privacy

    if not 0 <= config.models_per_client <= len(names):
        problems.append(f"models-per-client={config.models_per_client}: must be between 1 and {len(names)}, or 0 for all")
    elif config.privacy in privacy.names() and not privacy.get(config.privacy).sees_updates \
            and config.models_per_client not in (0, len(names)):
        problems.append(
            f"models-per-client={config.models_per_client} cannot work with privacy={config.privacy}: the server adds "
            "the same masked or encrypted vector from every client, so every client must train every model; "
            "set models-per-client=0, or privacy=plain"
        )
    return problems
