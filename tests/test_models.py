import pytest
import torch

from fedlearn import data, models


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
@pytest.mark.parametrize("dataset", ["digits", "mnist", "synthetic32"])
def test_forward_shape_on_each_compatible_dataset(name, dataset):
    shape = data.spec(dataset).shape
    if models.incompatibility(name, shape):
        with pytest.raises(ValueError, match="divisible"):
            models.build(name, shape, 10)
        return
    model = models.build(name, shape, 10)
    assert model(torch.zeros(3, *shape)).shape == (3, 10)


def test_paper_parameter_counts():
    # McMahan et al. 2017: 2NN has 199,210 parameters, the CNN 1,663,370.
    assert models.count_parameters(models.build("mnist-2nn", (1, 28, 28), 10)) == 199_210
    assert models.count_parameters(models.build("mnist-cnn", (1, 28, 28), 10)) == 1_663_370


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = models.build("mlp", (1, 8, 8), 10, seed=3)
    after = torch.rand(1)
    b = models.build("mlp", (1, 8, 8), 10, seed=3)
    c = models.build("mlp", (1, 8, 8), 10, seed=4)
    assert torch.equal(before, after)
    for (ka, va), (_, vb), (_, vc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(va, vb), ka
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.build("resnet", (1, 8, 8), 10)


def test_mlp_hidden_sets_the_width_of_the_run_model():
    from fedlearn.config import RunConfig

    config = RunConfig.from_flat({"dataset": "digits", "model": "mlp", "mlp-hidden": 128})
    assert models.count_parameters(models.for_run(config)) == 64 * 128 + 128 + 128 * 10 + 10


def test_init_schemes_set_the_tensorflow_era_weights_and_keep_seeds_reproducible():
    from fedlearn.config import RunConfig

    config = RunConfig.from_flat({"dataset": "mnist", "model": "mnist-2nn", "model-init": "truncated-normal"})
    model = models.for_run(config)
    first = model[1]
    assert float(first.weight.abs().max()) <= 0.2  # cut at two standard deviations of 0.1
    assert 0.08 < float(first.weight.std()) < 0.09  # a N(0, 0.1) cut at 2 std has std 0.088
    assert torch.all(first.bias == 0.1)
    assert torch.equal(models.for_run(config)[1].weight, first.weight)
    glorot = models.build("mnist-2nn", (1, 28, 28), 10, seed=1, init="glorot-uniform")[1]
    bound = (6 / (784 + 200)) ** 0.5
    assert float(glorot.weight.abs().max()) <= bound and float(glorot.weight.abs().max()) > 0.9 * bound
    assert torch.all(glorot.bias == 0)
    default = models.build("mnist-2nn", (1, 28, 28), 10, seed=1)[1]
    assert float(default.weight.abs().max()) <= 784**-0.5  # PyTorch's own: uniform in 1/sqrt(fan_in)


def test_unknown_init_is_refused_by_name():
    from fedlearn.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="model-init='he-normal': choose one of pytorch, glorot-uniform, truncated-normal"):
        RunConfig.from_flat({"model-init": "he-normal"})
