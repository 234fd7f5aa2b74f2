"""A client whose local epochs are a DistributedDataParallel job: real processes (Gloo on CPU),
the same update as one process, and the config and device checks around it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from clients import ddp
from fedlearn import data, models
from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError
from fedlearn.training import train
from tests.helpers import run_simulation

BASE = {"privacy": "plain", "num-clients": 3, "local-epochs": 2, "batch-size": 32, "device": "cpu"}


def config(**overrides) -> RunConfig:
    return RunConfig.from_flat({**BASE, **overrides})


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((a.state_dict()[k] - b.state_dict()[k]).abs().max().item() for k in a.state_dict())


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"model": "mlp"}, id="mlp"),
        pytest.param({"model": "mnist-cnn", "local-epochs": 1}, id="mnist-cnn", marks=pytest.mark.slow),
        # the regularisers are added once per rank, not scaled: DDP's average keeps them whole
        pytest.param({"model": "mlp", "strategy": "fedprox", "proximal-mu": 0.5, "l1": 1e-4, "clip-grad-norm": 0.5,
                      "optimizer": "adam", "lr": 0.01}, id="fedprox-l1-clip-adam", marks=pytest.mark.slow),
    ],
)
def test_a_two_process_gloo_client_computes_the_single_process_update(overrides):
    """Same data, seed and starting weights: the 2-rank job's weights and training metrics equal
    one process's to float tolerance (every batch, including the odd-sized last one)."""
    single_cfg, ddp_cfg = config(**overrides), config(**overrides, **{"ddp-world-size": 2})
    split = data.client_split(single_cfg, 0, 3)
    assert len(split) % single_cfg.batch_size % 2 == 1  # the last batch splits unevenly over the ranks
    alone = models.for_run(single_cfg)
    together = copy.deepcopy(alone)
    expected = train(alone, split, single_cfg, 1, seed=7)
    result = ddp.train_data_parallel(together, split, ddp_cfg, 1, seed=7)
    assert max_difference(alone, together) < 1e-5
    assert max_difference(alone, models.for_run(single_cfg)) > 1e-2  # it did train
    assert result.num_examples == expected.num_examples and result.steps == expected.steps
    assert result.loss == pytest.approx(expected.loss, rel=1e-5)
    assert result.accuracy == pytest.approx(expected.accuracy, abs=1.5 / len(split))


@pytest.mark.slow
def test_ranks_train_private_copies_and_the_caller_gets_the_trained_weights():
    """torch hands tensors to spawned processes in shared memory: if the ranks stepped those,
    the update would be world-size times too large (the bug this guards against)."""
    cfg = config(model="logreg", **{"ddp-world-size": 2, "local-epochs": 1, "batch-size": 1000, "optimizer": "sgd", "lr": 1.0})
    split = data.client_split(cfg, 0, 3)
    start = models.for_run(cfg)
    one, two = copy.deepcopy(start), copy.deepcopy(start)
    train(one, split, config(model="logreg", **{"local-epochs": 1, "batch-size": 1000, "optimizer": "sgd", "lr": 1.0}), 1, seed=1)
    ddp.train_data_parallel(two, split, cfg, 1, seed=1)
    step_one = one.state_dict()["1.weight"] - start.state_dict()["1.weight"]
    step_two = two.state_dict()["1.weight"] - start.state_dict()["1.weight"]
    torch.testing.assert_close(step_two, step_one, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"ddp-world-size": 0}, "ddp-world-size=0: must be between 1"),
        ({"ddp-world-size": 2, "strategy": "fedmd", "models": "logreg,mlp"}, "ddp-world-size=2 with strategy=fedmd"),
        ({"ddp-world-size": 2, "strategy": "multimodel", "models": "logreg,mlp"}, "ddp-world-size=2 with strategy=multimodel"),
        ({"amp": "fp8"}, "amp"),
        ({"compile": "fast"}, "compile"),
        ({"client-resources-num-gpus": -0.5}, "client-resources-num-gpus=-0.5: must be >= 0"),
    ],
)
def test_config_errors_name_the_problem(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        config(**overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors where no GPU is visible")
def test_gpus_asked_for_where_there_are_none_are_refused():
    from simulations import engine

    with pytest.raises(ConfigError, match="device=cuda but no CUDA GPU is visible"):
        ddp.train_data_parallel(models.for_run(config()), data.client_split(config(), 0, 3),
                                config(**{"device": "cuda", "ddp-world-size": 2}), 1, seed=1)
    with pytest.raises(ConfigError, match="client-resources-num-gpus=0.5 but no CUDA GPU is visible"):
        engine.simulate(None, None, 2, num_gpus_per_client=0.5)


@pytest.mark.slow
def test_a_ddp_client_in_a_flower_simulation_matches_single_process_clients(tmp_path):
    """Real Flower rounds whose clients each spawn a 2-process Gloo job: the run's accuracy and
    final model equal the same run with one process per client, and the audit log verifies."""
    from safetensors.numpy import load_file

    from crypto import signing
    from fedlearn import audit

    runs = {}
    for world in (1, 2):
        cfg = config(model="mlp", **{"num-clients": 2, "num-rounds": 2, "ddp-world-size": world, "out-dir": str(tmp_path / str(world))})
        summary = run_simulation(cfg)[0]
        run_dir = tmp_path / str(world) / summary["run_id"]
        verdict = audit.verify(run_dir / "audit.jsonl", signing.load_public(run_dir / "audit.pub"))
        assert verdict.ok, verdict.summary()
        runs[world] = (json.loads((run_dir / "metrics.json").read_text()), load_file(run_dir / "model.safetensors"))
    (metrics_1, weights_1), (metrics_2, weights_2) = runs[1], runs[2]
    assert [m["accuracy"] for m in metrics_2] == pytest.approx([m["accuracy"] for m in metrics_1], abs=1e-3)
    for name, value in weights_1.items():
        np.testing.assert_allclose(weights_2[name], value, atol=1e-4, err_msg=name)
