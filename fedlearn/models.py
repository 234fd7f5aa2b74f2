"""Model registry. Each builder takes the input shape (C, H, W) and the number of classes."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fedlearn.config import MODEL_INITS

Shape = tuple[int, int, int]


def logreg(shape: Shape, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), num_classes))


def mlp(shape: Shape, num_classes: int, hidden: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def mnist_2nn(shape: Shape, num_classes: int) -> nn.Module:
    """McMahan et al. 2017, "2NN": two hidden layers of 200 ReLU units."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(shape), 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, num_classes),
    )


def mnist_cnn(shape: Shape, num_classes: int) -> nn.Module:
    """McMahan et al. 2017, "CNN": 5x5 conv 32, pool, 5x5 conv 64, pool, fc 512, softmax.

    On 28x28 inputs it has 1,663,370 parameters, as in the paper. The softmax lives in the
    cross-entropy loss.
    """
    channels, height, width = shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (height // 4) * (width // 4), 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def vision_cnn(shape: Shape, num_classes: int) -> nn.Module:
    """A small VGG-style network for 32x32x3 images: three conv blocks, then two dense layers.

    No batch norm on purpose: its running statistics are integer/float buffers that plain
    federated averaging (and encrypted sums) handle badly.
    """
    channels, height, width = shape

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(channels, 32),
        *block(32, 64),
        *block(64, 128),
        nn.Flatten(),
        nn.Linear(128 * (height // 8) * (width // 8), 256),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(256, num_classes),
    )


REGISTRY: dict[str, Callable[[Shape, int], nn.Module]] = {
    "logreg": logreg,
    "mlp": mlp,
    "mnist-2nn": mnist_2nn,
    "mnist-cnn": mnist_cnn,
    "vision-cnn": vision_cnn,
}
# Spatial downsampling factor of the conv models: inputs must be divisible by it.
_DOWNSAMPLING = {"mnist-cnn": 4, "vision-cnn": 8}


def incompatibility(name: str, shape: Shape) -> str | None:
    """Why ``name`` cannot take inputs of ``shape``, or None when it can."""
    factor = _DOWNSAMPLING.get(name)
    if factor and (shape[1] % factor or shape[2] % factor):
        return f"needs image sides divisible by {factor}, the dataset's are {shape[1]}x{shape[2]}"
    return None


def initialise(model: nn.Module, scheme: str) -> nn.Module:
    """Redraw the linear and conv layers' weights by ``scheme`` (MODEL_INITS): a replication of a
    paper written with TensorFlow can start where that paper started. pytorch keeps the layers'
    own defaults (uniform in +-1/sqrt(fan_in)); glorot-uniform is Keras's default (biases 0);
    truncated-normal is the 2015-16 TensorFlow MNIST tutorials' N(0, 0.1) cut at two standard
    deviations, biases 0.1."""
    if scheme not in MODEL_INITS:
        raise ValueError(f"unknown model-init {scheme!r}; choose one of {', '.join(MODEL_INITS)}")
    if scheme == "pytorch":
        return model
    for layer in model.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            if scheme == "glorot-uniform":
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
            else:
                nn.init.trunc_normal_(layer.weight, std=0.1, a=-0.2, b=0.2)
                nn.init.constant_(layer.bias, 0.1)
    return model


def build(name: str, shape: Shape, num_classes: int, seed: int | None = None, init: str = "pytorch",
          **options) -> nn.Module:
    """Build a registered model; with ``seed`` its initial weights are reproducible. ``init``
    names the initial weights' scheme (MODEL_INITS), ``options`` go to the model's builder (mlp:
    ``hidden``)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(REGISTRY)}")
    reason = incompatibility(name, shape)
    if reason:
        raise ValueError(f"model {name}: {reason}")
    if seed is None:
        return initialise(REGISTRY[name](shape, num_classes, **options), init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return initialise(REGISTRY[name](shape, num_classes, **options), init)


def for_run(config, *, seeded: bool = True, name: str | None = None, seed: int | None = None) -> nn.Module:
    """The run's model for its dataset: at the run's seeded initial weights, or unseeded (a
    container to load received weights into). ``name`` builds another architecture of the run
    (multimodel, fedmd), ``seed`` starts from another seed (ifca's clusters, fedmd's clients)."""
    from fedlearn import data

    spec = data.spec(config.dataset)
    name = name or config.model
    options = {"hidden": config.mlp_hidden} if name == "mlp" else {}
    start = (config.seed if seed is None else seed) if seeded else None
    return build(name, spec.shape, spec.num_classes, seed=start, init=config.model_init, **options)


def numpy_state(model: nn.Module) -> dict:
    """The model's state dict as numpy arrays (on the CPU)."""
    return {name: value.detach().cpu().numpy() for name, value in model.state_dict().items()}


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that hold parameters of their own (linear and conv layers), input to output."""
    return [(name, m) for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def personal_names(config, model: nn.Module) -> frozenset[str]:
    """State-dict names that never leave a client: under fedper, the parameters of the last
    personal-layers layers (the head); nothing otherwise."""
    count = config.personal_layer_count()
    if not count:
        return frozenset()
    head = layers(model)[-count:]
    return frozenset(f"{name}.{p}" if name else p for name, module in head for p, _ in module.named_parameters(recurse=False))


def shared_state(config, model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of the model that is federated: every tensor but the personal ones."""
    personal = personal_names(config, model)
    return {name: value for name, value in model.state_dict().items() if name not in personal}


def load_shared(model: nn.Module, config, state: dict[str, torch.Tensor]) -> None:
    """Load the federated part into ``model``; its personal layers stay as they are."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    personal = personal_names(config, model)
    if unexpected or set(missing) != personal:
        raise ValueError(
            f"the received model does not fit {config.model}: missing {sorted(set(missing) - personal)}, "
            f"unexpected {sorted(unexpected)}"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def set_problems(config) -> list[str]:
    """The checks of ``models``, for the strategies that train several architectures: each is a
    known model and fits the dataset."""
    from fedlearn import data
    from fedlearn.config import DATASETS, MODELS

    names = config.model_names()
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        return [f"models: unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}"]
    if config.dataset not in DATASETS:
        return []
    shape = data.spec(config.dataset).shape
    return [f"models: {name} with dataset={config.dataset}: {why}" for name in names if (why := incompatibility(name, shape))]
