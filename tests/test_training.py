import copy

import numpy as np
import pytest
import torch

from fedlearn import data, models
from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError
from fedlearn.training import (
    check_finite,
    client_seed,
    evaluate,
    make_optimizer,
    mixed_precision,
    round_lr,
    select_device,
    to_device,
    train,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "", 0.2, 42)


def fresh(config: RunConfig):
    return models.build(config.model, (1, 8, 8), 10, seed=config.seed)


def flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_training_learns_digits(digits):
    config = RunConfig.from_flat({"local-epochs": 5})
    model = fresh(config)
    loss_before, acc_before = evaluate(model, digits.test, CPU)
    result = train(model, digits.train, config, 1, seed=0)
    loss_after, acc_after = evaluate(model, digits.test, CPU)
    assert result.num_examples == len(digits.train)
    assert result.steps == 5 * -(-len(digits.train) // config.batch_size)
    assert acc_before < 0.3 and acc_after > 0.9 and loss_after < loss_before


def test_training_is_deterministic_for_a_seed(digits):
    config = RunConfig()
    a, b, c = fresh(config), fresh(config), fresh(config)
    train(a, digits.train, config, 1, seed=11)
    train(b, digits.train, config, 1, seed=11)
    train(c, digits.train, config, 1, seed=12)
    assert torch.equal(flat_weights(a), flat_weights(b))
    assert not torch.equal(flat_weights(a), flat_weights(c))


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_each_optimizer_trains(digits, optimizer):
    config = RunConfig.from_flat({"optimizer": optimizer, "lr": 0.01 if optimizer == "adam" else 0.1})
    model = fresh(config)
    assert isinstance(make_optimizer(model, config, config.lr), torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)
    train(model, digits.train, config, 1, seed=0)
    assert evaluate(model, digits.test, CPU)[1] > 0.8


def test_lr_decay_per_round():
    config = RunConfig.from_flat({"lr": 0.1, "lr-decay": 0.5})
    assert [round_lr(config, r) for r in (1, 2, 3)] == [0.1, 0.05, 0.025]


def test_l1_and_l2_shrink_weights(digits):
    base = RunConfig.from_flat({"local-epochs": 3})
    plain, l1, l2 = fresh(base), fresh(base), fresh(base)
    train(plain, digits.train, base, 1, seed=0)
    train(l1, digits.train, base.replace(l1=1e-3), 1, seed=0)
    train(l2, digits.train, base.replace(weight_decay=1e-2), 1, seed=0)
    assert flat_weights(l1).abs().sum() < flat_weights(plain).abs().sum()
    assert flat_weights(l2).norm() < flat_weights(plain).norm()


def test_proximal_term_keeps_weights_near_global(digits):
    base = RunConfig.from_flat({"local-epochs": 3, "lr": 0.1})
    start = fresh(base)
    free, prox = copy.deepcopy(start), copy.deepcopy(start)
    train(free, digits.train, base, 1, seed=0)
    train(prox, digits.train, base.replace(strategy="fedprox", proximal_mu=1.0), 1, seed=0)
    drift = lambda m: (flat_weights(m) - flat_weights(start)).norm()  # noqa: E731
    assert drift(prox) < drift(free)


def test_gradient_clipping_bounds_the_step(digits):
    base = RunConfig.from_flat({"optimizer": "sgd", "lr": 1.0, "batch-size": 2000, "local-epochs": 1})
    start = fresh(base)
    clipped = copy.deepcopy(start)
    train(clipped, digits.train, base.replace(clip_grad_norm=0.01), 1, seed=0)
    # One full-batch SGD step of lr 1 with gradient norm <= 0.01 moves weights by <= 0.01.
    assert (flat_weights(clipped) - flat_weights(start)).norm() <= 0.01 + 1e-6


def test_nan_weights_are_refused():
    state = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(FloatingPointError, match="'w' contain NaN"):
        check_finite(state)
    check_finite({"w": torch.ones(2), "steps": torch.tensor([3])})


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert select_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            select_device("cuda")


def test_client_seeds_differ():
    seeds = {client_seed(42, r, p) for r in range(3) for p in range(5)}
    assert len(seeds) == 15 and all(isinstance(s, int) for s in seeds)
    assert client_seed(1, 1, 1) == client_seed(1, 1, 1)
    assert np.iinfo(np.uint32).max >= max(seeds)


@pytest.mark.parametrize("amp", ["auto", "bf16", "fp16", "off"])
def test_cpu_trains_in_full_precision_whatever_amp_says(amp):
    autocast, scaler = mixed_precision(CPU, amp)
    assert scaler is None
    with autocast:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    array = np.arange(6, dtype=np.float32)
    assert to_device(array, CPU).data_ptr() == torch.from_numpy(array).data_ptr()  # no copy on CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_precision_picks_bf16_without_a_scaler_or_fp16_with_one():
    gpu = torch.device("cuda")
    autocast, scaler = mixed_precision(gpu, "fp16")
    with autocast:
        assert (torch.ones(2, 2, device=gpu) @ torch.ones(2, 2, device=gpu)).dtype == torch.float16
    assert scaler is not None
    assert mixed_precision(gpu, "off")[1] is None
    if torch.cuda.is_bf16_supported():
        autocast, scaler = mixed_precision(gpu, "auto")
        with autocast:
            assert (torch.ones(2, 2, device=gpu) @ torch.ones(2, 2, device=gpu)).dtype == torch.bfloat16
        assert scaler is None
    tensor = to_device(np.ones(4, np.float32), gpu)
    assert tensor.device.type == "cuda" and tensor.sum().item() == 4


@pytest.mark.slow
def test_a_compiled_model_trains_to_the_eager_weights(digits):
    """compile=default runs torch.compile's graph (Inductor; on CPU it needs a C++ compiler) and
    lands on the eager run's weights to float tolerance, under the eager model's own names."""
    eager_config = RunConfig.from_flat({"model": "mlp", "privacy": "plain"})
    compiled_config = RunConfig.from_flat({"model": "mlp", "privacy": "plain", "compile": "default"})
    eager, compiled = fresh(eager_config), fresh(eager_config)
    train(eager, digits.train, eager_config, 1, seed=3)
    train(compiled, digits.train, compiled_config, 1, seed=3)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch.testing.assert_close(flat_weights(compiled), flat_weights(eager), atol=1e-5, rtol=1e-4)
