"""FedMD (Li & Wang 2019): heterogeneous models that learn from each other through what they
say about a public, unlabeled set.

Each client owns a model of its own architecture (``models``, given out by partition id)
that never leaves it. A round: the client digests the consensus (distils its model towards the
averaged class probabilities on the public set), revisits its private data (``local-epochs`` of
ordinary training), then sends its own class probabilities on the public set. The server's
"model" is the consensus, a ``public-size x classes`` array and their example-weighted average:
a weighted sum, so it runs under secure aggregation and HE like FedAvg does. Probabilities,
not logits: they lie in [0, 1], which gives the fixed-point encodings a range known in advance.

The average of several models' probabilities is less confident than any of them (where they
disagree it spreads out), so distilling it as it is teaches each model to hedge.
``consensus-temperature`` below 1 sharpens it first, ``p ** (1/T)`` renormalised: the entropy
reduction averaging of DS-FL (Itahara et al. 2021). Clients sharpen what they decrypt or unmask,
so it works under every privacy mode (the server never sees the consensus under he).

With ``distill-epochs=0`` nothing from other clients reaches a model: that is local-only
training on the same data, models and seeds, the baseline FedMD must beat.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedlearn import data, models
from fedlearn.families import ClientRound, LocalUpdate
from fedlearn.fedavg import FedAvgFamily, detached
from fedlearn.training import select_device

SOFT_LABELS = "soft-labels"  # the consensus (request) or a client's probabilities (reply)
PRIVATE_MODEL = "fedmd-model"  # a client's own model, in its Flower context between rounds


def architecture(config, partition_id: int) -> str:
    """The model a client owns: models taken in turn by partition id (else model)."""
    names = config.model_names()
    return names[partition_id % len(names)]


def private_model(config, partition_id: int) -> nn.Module:
    """A client's model at its seeded initial weights (seed and partition id, so a local-only
    run starts every client where its fedmd run does)."""
    return models.for_run(config, name=architecture(config, partition_id), seed=config.seed + 1000 * (partition_id + 1))


def initial_consensus(config) -> dict[str, torch.Tensor]:
    """Uniform class probabilities: round 1 has no consensus to digest."""
    classes = data.spec(config.dataset).num_classes
    return {SOFT_LABELS: torch.full((config.public_size_count(), classes), 1.0 / classes)}


@torch.no_grad()
def soft_labels(model: nn.Module, public: np.ndarray, device: torch.device, batch_size: int = 512) -> np.ndarray:
    """The model's class probabilities on the public set."""
    model.to(device).eval()
    out = [torch.softmax(model(torch.from_numpy(public[i : i + batch_size]).to(device)).float(), 1).cpu()
           for i in range(0, len(public), batch_size)]
    return torch.cat(out).numpy().astype(np.float32)


def sharpened(consensus: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities raised to 1/temperature and renormalised per example (softmax of
    log p / T): the same most likely class, lower entropy for T < 1; T = 1 only renormalises."""
    log_p = np.log(np.clip(consensus, 1e-12, None).astype(np.float64)) / temperature
    log_p -= log_p.max(1, keepdims=True)
    p = np.exp(log_p)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def digest(model: nn.Module, public: np.ndarray, consensus: np.ndarray, config, *, seed: int) -> float:
    """Distil ``model`` towards the consensus probabilities, sharpened by consensus-temperature
    (KL divergence), for distill-epochs; returns the last epoch's mean loss."""
    device = select_device(config.device)
    model.to(device).train()
    x = torch.from_numpy(public).to(device)
    # sharpened() also renormalises: the encodings' rounding leaves sums near 1, values near 0 below it
    target = torch.from_numpy(sharpened(consensus, config.consensus_temperature)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.distill_lr)
    generator = torch.Generator().manual_seed(seed)
    loss_sum = 0.0
    for _ in range(config.distill_epochs):
        order, loss_sum = torch.randperm(len(x), generator=generator).to(device), 0.0
        for start in range(0, len(x), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            log_probs = torch.log_softmax(model(x[batch]).float(), 1)
            loss = nn.functional.kl_div(log_probs, target[batch], reduction="batchmean")
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch)
    return loss_sum / max(len(x), 1)


def private_state(config, partition_id: int, state) -> nn.Module:
    """This node's own model, as its last round left it (its seeded start before that)."""
    model = private_model(config, partition_id)
    if PRIVATE_MODEL in state:
        model.load_state_dict(state[PRIVATE_MODEL].to_torch_state_dict())
    return model


class FedMDFamily(FedAvgFamily):
    """Flower's FedAvg on the clients' class probabilities; each client trains a model of its own."""

    def build(self, config, **common):
        from flwr.serverapp.strategy import FedAvg

        return FedAvg(**common)

    def template(self, config) -> dict[str, torch.Tensor]:
        return initial_consensus(config)

    def model(self, local: ClientRound) -> nn.Module:
        return private_state(local.config, local.task.partition_id, local.state)  # the consensus says nothing to test

    def client_update(self, local: ClientRound) -> LocalUpdate:
        """Digest the consensus (from round 2 on), revisit the private data, describe the public set."""
        from flwr.app import ArrayRecord

        config, model = local.config, self.model(local)
        public = data.public_split(config).x
        if local.task.server_round > 1 and config.distill_epochs:
            digest(model, public, local.arrays[SOFT_LABELS], config, seed=local.seed)
        result = local.train(model)
        local.state[PRIVATE_MODEL] = ArrayRecord(detached(model.state_dict()))
        probabilities = soft_labels(model, public, select_device(config.device))
        return LocalUpdate({SOFT_LABELS: torch.from_numpy(probabilities)}, result, {})

    def test_split(self, local: ClientRound) -> data.Split:
        if local.config.local_test_fraction:
            return super().test_split(local)
        return data.test_split(local.config)  # every client owns a different model: test each on all of it


def config_problems(config) -> list[str]:
    """strategy=fedmd's own checks: its public set, its distillation, its models."""
    from fedlearn.config import DATASETS

    problems = [] if config.public_size >= 0 else [
        f"public-size={config.public_size}: must be >= 1, or 0 for a tenth of the training data"]
    if config.distill_epochs < 0:
        problems.append(f"distill-epochs={config.distill_epochs}: must be >= 0 (0 = local-only training, no distillation)")
    if config.distill_lr <= 0:
        problems.append(f"distill-lr={config.distill_lr}: must be > 0")
    if not config.consensus_temperature > 0:
        problems.append(f"consensus-temperature={config.consensus_temperature}: must be > 0 (1 = the consensus as averaged, < 1 sharpens it)")
    problems += models.set_problems(config)
    if config.dataset in DATASETS and not data.spec(config.dataset).per_user and config.public_size >= 0:
        train_size = data.spec(config.dataset).approx_train_size(config.test_fraction)
        public = config.public_size_count()
        if public + config.num_clients > train_size:
            problems.append(
                f"public-size={public} leaves {train_size - public} of {config.dataset}'s ~{train_size} training "
                f"examples for {config.num_clients} clients; use a smaller public-size"
            )
    return problems
