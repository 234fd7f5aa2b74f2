"""FedPer: clients keep their last layers; only the body is federated, under every privacy mode.
Each client's own test data (local-test-fraction) follows its skewed label distribution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from fedlearn.fedper import keep_personal_layers, personal_layers
from fedlearn import data, models
from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError
from fedlearn.runs import load_model
from fedlearn.checkpoint import CheckpointError
from server.resume import load_checkpoint
from tests.helpers import run_simulation

FEDPER = {"strategy": "fedper", "privacy": "plain"}


def config(**overrides) -> RunConfig:
    return RunConfig.from_flat({**FEDPER, **overrides})


def test_the_classifier_is_personal_and_the_rest_shared():
    cfg = config()
    model = models.for_run(cfg)
    assert models.personal_names(cfg, model) == {"3.weight", "3.bias"}
    assert set(models.shared_state(cfg, model)) == {"1.weight", "1.bias"}
    deeper = config(model="mnist-2nn", **{"personal-layers": 2})
    assert models.personal_names(deeper, models.for_run(deeper)) == {"3.weight", "3.bias", "5.weight", "5.bias"}
    fedavg = RunConfig.from_flat({"strategy": "fedavg"})
    assert models.personal_names(fedavg, model) == frozenset()
    assert set(models.shared_state(fedavg, model)) == set(model.state_dict())


def test_loading_the_body_keeps_the_personal_head_and_refuses_a_foreign_model():
    cfg = config()
    mine, other = models.for_run(cfg), models.for_run(cfg.replace(seed=9))
    head = {k: v.clone() for k, v in mine.state_dict().items() if k.startswith("3.")}
    models.load_shared(mine, cfg, models.shared_state(cfg, other))
    for name, value in mine.state_dict().items():
        expected = head[name] if name in head else other.state_dict()[name]
        assert torch.equal(value, expected), name
    with pytest.raises(ValueError, match="does not fit"):
        models.load_shared(mine, cfg, other.state_dict())  # a whole model: the head is not the server's to set


def test_personal_layers_live_in_the_node_state_between_rounds():
    cfg = config()
    state = RecordDict()
    model = models.for_run(cfg, seeded=False)
    first = personal_layers(model, cfg, state)
    initial = models.for_run(cfg).state_dict()
    assert set(first) == {"3.weight", "3.bias"} and all(torch.equal(first[k], initial[k]) for k in first)
    with torch.no_grad():
        model[3].weight.add_(1.0)
    keep_personal_layers(model, cfg, state)
    assert isinstance(state["personal"], ArrayRecord)
    again = personal_layers(models.for_run(cfg, seeded=False), cfg, state)
    assert torch.equal(again["3.weight"], model[3].weight)
    assert personal_layers(model, RunConfig.from_flat({"strategy": "fedavg"}), state) == {}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"evaluate-on": "server"}, "evaluate-on=server cannot work with strategy=fedper"),
        ({"model": "logreg"}, "model=logreg has 1 layer"),
        ({"personal-layers": 2}, "model=mlp has 2 layer"),
        ({"strategy": "fedavg", "personal-layers": 1}, "personal-layers=1 only applies to strategy=fedper"),
        ({"strategy": "fedavg", "local-test-fraction": 0.2, "evaluate-on": "server"}, "use evaluate-on=clients"),
        ({"local-test-fraction": 1.0}, r"local-test-fraction=1.0: must be in \[0, 1\)"),
    ],
)
def test_config_errors_name_the_problem(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        config(**overrides)


def test_fedper_evaluates_on_clients_under_every_mode():
    for privacy in ("plain", "secagg", "he"):
        assert config(privacy=privacy).evaluates_on_clients()
    assert RunConfig.from_flat({"local-test-fraction": 0.2}).evaluates_on_clients()


def test_local_test_data_is_held_out_of_the_clients_own_partition():
    cfg = RunConfig.from_flat({"partitioner": "dirichlet", "dirichlet-alpha": 0.1, "local-test-fraction": 0.25})
    whole = RunConfig.from_flat({"partitioner": "dirichlet", "dirichlet-alpha": 0.1})
    for pid in range(cfg.num_clients):
        train, test, full = data.client_split(cfg, pid, 10), data.client_test_split(cfg, pid, 10), data.client_split(whole, pid, 10)
        assert len(train) + len(test) == len(full)
        assert abs(len(test) - 0.25 * len(full)) <= 1
        rows = {row.tobytes() for row in full.x}
        assert {row.tobytes() for row in train.x} | {row.tobytes() for row in test.x} <= rows
        assert not {row.tobytes() for row in train.x} & {row.tobytes() for row in test.x}
        # Skew carries over: the test labels are ones the client trains on.
        assert set(test.y) <= set(train.y) | set(full.y)
    np.testing.assert_array_equal(data.client_test_split(cfg, 3, 10).x, data.client_test_split(cfg, 3, 10).x)


@pytest.mark.parametrize("privacy", ["plain", pytest.param("secagg", marks=pytest.mark.slow)])
def test_fedper_in_a_flower_simulation_never_sends_the_head(tmp_path, privacy):
    """Real Flower rounds: every update holds the body alone, the saved global model has no head,
    and the clients' personal models test well on their own skewed data."""
    cfg = config(**{
        "privacy": privacy, "num-clients": 4, "num-rounds": 3, "partitioner": "dirichlet", "dirichlet-alpha": 0.1,
        "local-test-fraction": 0.2, "out-dir": str(tmp_path),
    })
    summary, recorder = run_simulation(cfg, record=True)
    updates = [m for m in recorder.received if m.metadata.message_type == "train"]
    assert len(updates) == 12
    if privacy == "plain":
        assert all(set(m.content["arrays"]) == {"1.weight", "1.bias"} for m in updates)
    else:  # one masked vector of the body's length
        body = sum(v.numel() for v in models.shared_state(cfg, models.for_run(cfg)).values())
        assert all(list(m.content["arrays"]["masked"].shape) == [body] for m in updates)
    run_dir = tmp_path / summary["run_id"]
    assert set(load_model(run_dir / "model.safetensors")) == {"1.weight", "1.bias"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics[-1]["accuracy"] > 0.85 and metrics[-1]["federated_accuracy"] == metrics[-1]["accuracy"]
    # The heads live on the clients, so no server checkpoint can resume the run.
    with pytest.raises(CheckpointError, match="strategy=fedper cannot be resumed"):
        load_checkpoint(run_dir)
