"""Recommended local training for each model and dataset: the optimizer, lr, E and B a run
uses where the user sets none (optimizer=auto, lr=0, local-epochs=0, batch-size=0).

One set of values cannot suit every pair. Momentum SGD at lr 0.05 with E=2, B=16 learns the
digits (about 290 examples a client at 5 clients: 36 steps a round) but on MNIST (12,000 a
client: 1,500 steps) five local models drift so far apart that their average tests at chance.
Each recipe below was measured to learn well above chance in 3 rounds with 5 clients
(tests/test_recipes.py, slow); docs/training.md has the table and the figures.
"""

from __future__ import annotations

from dataclasses import dataclass

# A config value that means "the recipe's": the keys' defaults.
AUTO = {"optimizer": "auto", "lr": 0.0, "local_epochs": 0, "batch_size": 0}

# Datasets with a few hundred examples a client: more, smaller steps per round.
SMALL = frozenset({"digits", "rotated-digits"})


@dataclass(frozen=True)
class Recipe:
    optimizer: str
    lr: float
    local_epochs: int
    batch_size: int

    def values(self) -> dict[str, object]:
        return {"optimizer": self.optimizer, "lr": self.lr, "local_epochs": self.local_epochs,
                "batch_size": self.batch_size}


# The default job's values (mlp on the digits), kept for every small-data pair but vision-cnn.
SMALL_DATA = Recipe("momentum", 0.05, 2, 16)
# Plain SGD as McMahan et al. 2017 train the 2NN and CNN, one epoch of batches of 32.
LARGE_DATA = Recipe("sgd", 0.05, 1, 32)
# The VGG-style CNN has no batch norm: SGD at these rates does not start learning in 3 rounds,
# Adam does (its state starts afresh each round, as every client optimizer's does).
VISION_CNN = {True: Recipe("adam", 0.0005, 5, 8), False: Recipe("adam", 0.001, 1, 32)}


# One user a client, 8 to 200 examples each (synthetic-users): McMahan et al.'s E=5, B=10 gives
# each a few dozen steps a round.
PER_USER = frozenset({"synthetic-users"})
USERS = Recipe("sgd", 0.1, 5, 10)


def recommended(model: str, dataset: str) -> Recipe:
    """The recipe for ``model`` on ``dataset`` (unknown names get the large-data one; the
    config's validation names them)."""
    if dataset in PER_USER:
        return USERS
    small = dataset in SMALL
    if model == "vision-cnn":
        return VISION_CNN[small]
    return SMALL_DATA if small else LARGE_DATA


def markdown_table(datasets: tuple[str, ...]) -> str:
    """The recipes as a markdown table (in the configuration reference)."""
    small = [d for d in datasets if d in SMALL]
    large = [d for d in datasets if d not in SMALL | PER_USER]
    lines = ["| datasets | model | optimizer | lr | local-epochs (E) | batch-size (B) |", "|---|---|---|---|---|---|"]
    for names in (small, large):
        for model, label in (("vision-cnn", "vision-cnn"), ("mlp", "every other model")):
            r = recommended(model, names[0])
            lines.append(f"| {', '.join(names)} | {label} | {r.optimizer} | {r.lr:g} | {r.local_epochs} | {r.batch_size} |")
    for name in sorted(PER_USER & set(datasets)):
        r = recommended("mlp", name)
        lines.append(f"| {name} | every model | {r.optimizer} | {r.lr:g} | {r.local_epochs} | {r.batch_size} |")
    return "\n".join(lines) + "\n"
