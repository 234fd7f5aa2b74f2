"""FedPer (Arivazhagan et al. 2019): FedAvg on the shared layers, while every client keeps its
last ``personal-layers`` layers (the head, fedlearn.models.personal_names) to itself, in its
Flower context between rounds. The server's model is the body alone, so it runs under every
privacy mode; only clients can test a whole model."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, RecordDict

from fedlearn import models
from fedlearn.families import ClientRound, LocalUpdate
from fedlearn.fedavg import FedAvgFamily, detached, tensors
from fedlearn.messages import PERSONAL_RECORD


def personal_layers(model: torch.nn.Module, config, state: RecordDict) -> dict[str, torch.Tensor]:
    """This node's own last layers, kept in its Flower context between rounds (the seeded
    initial ones before its first round); empty for every other strategy."""
    names = models.personal_names(config, model)
    if not names:
        return {}
    if PERSONAL_RECORD in state:
        return state[PERSONAL_RECORD].to_torch_state_dict()
    initial = models.for_run(config).state_dict()
    return {name: initial[name] for name in names}


def keep_personal_layers(model: torch.nn.Module, config, state: RecordDict) -> None:
    names = models.personal_names(config, model)
    if names:
        state[PERSONAL_RECORD] = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items() if k in names})


class FedPerFamily(FedAvgFamily):
    """Flower's FedAvg on the body; the node puts its own head on what it receives."""

    def model(self, local: ClientRound) -> torch.nn.Module:
        model = models.for_run(local.config, seeded=False)
        model.load_state_dict(personal_layers(model, local.config, local.state), strict=False)
        models.load_shared(model, local.config, tensors(local.arrays))
        return model

    def client_update(self, local: ClientRound) -> LocalUpdate:
        model = self.model(local)
        result = local.train(model)
        keep_personal_layers(model, local.config, local.state)
        return LocalUpdate(detached(models.shared_state(local.config, model)), result, {})


def config_problems(config) -> list[str]:
    """strategy=fedper's own checks: at least one layer stays shared."""
    from fedlearn import data
    from fedlearn.config import DATASETS, MODELS

    if config.personal_layers < 0:
        return [f"personal-layers={config.personal_layers}: must be >= 1, or 0 for 1 (the classifier)"]
    if config.dataset not in DATASETS or config.model not in MODELS or models.incompatibility(config.model, data.spec(config.dataset).shape):
        return []  # the generic checks report these
    spec = data.spec(config.dataset)
    depth = len(models.layers(models.build(config.model, spec.shape, spec.num_classes)))
    if config.personal_layer_count() < depth:
        return []
    return [f"strategy={config.strategy} with personal-layers={config.personal_layer_count()}: model={config.model} has "
            f"{depth} layer(s), and at least one must be shared; use a deeper model or fewer personal layers"]
