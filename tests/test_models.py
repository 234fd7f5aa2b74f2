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
