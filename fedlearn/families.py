"""The strategy families by name: the one place that maps ``strategy=`` to its parts.

A family is one module that holds both halves of a strategy, behind the hooks of
``fedlearn.fedavg.FedAvgFamily`` (Flower's own strategies, the default): the server half (build
the Flower strategy, the initial global state, how an update is checked, the round's facts for
the audit log, evaluation on the server, what is saved at the end) and the client half (a
node's update, its evaluation). The table below holds each family's traits, which the config
checks, the server and the clients read instead of lists of strategy names, and names its
hooks as ``"module:attribute"``, loaded when a run uses them, so reading a config imports
neither torch nor Flower. A new strategy is one row here and its module; a test may register
objects instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

from fedlearn.registry import Ref, Registry, load

# How a strategy turns the updates into the next global model.
SUM = "sum"  # an example-weighted average: every privacy mode can compute it
SERVER_STEP = "server-step"  # the average, then a non-linear server step: the aggregate must be in clear
PER_UPDATE = "per-update"  # each update in clear (median, trimmed mean, Krum): only privacy=plain


@dataclass(frozen=True)
class Family:
    name: str
    hooks: Ref = "fedlearn.fedavg:FedAvgFamily"  # the class with both halves
    aggregate: str = SUM
    needs_clear_updates: str = ""  # why it needs each update in clear beyond its aggregate kind ("": it does not)
    server_cannot_evaluate: str = ""  # why the server cannot test what it trains ("": it can)
    not_resumable: str = ""  # why a run of it cannot resume from a checkpoint ("": it can)
    one_model: bool = True  # a client trains one model per round (so its local epochs can be a DDP job)
    several_models: bool = False  # the run trains several named models (``models``), each evaluated and saved
    asynchronous: bool = False  # it aggregates updates as they arrive: a round may pass without new replies
    keys: tuple[str, ...] = ()  # config keys that apply to this family only (or to the families that list them)
    checks: Ref | None = None  # (config) -> problems peculiar to this family

    def __reduce__(self):
        """Unpickling a family registers it: Ray ships the ClientApp, and the families it knows,
        to its workers, so a family registered outside fedlearn (a test's) exists there too."""
        return _restore, ({f.name: getattr(self, f.name) for f in fields(self)},)

    def needs_clear(self) -> bool:
        return self.aggregate == PER_UPDATE or bool(self.needs_clear_updates)

    def halves(self):
        """Its hooks (a ``FedAvgFamily``), for the server and the client half."""
        return load(self.hooks)()

    def problems(self, config) -> list[str]:
        return list(load(self.checks)(config)) if self.checks else []


@dataclass
class ClientRound:
    """What a node's half of a family works with in one round."""

    task: Any  # clients.app.NodeTask: the run config, round, partition id and training split
    state: Any  # the node's own RecordDict, kept between rounds (Flower's context.state)
    seed: int  # this client's seed for this round
    fit: Callable  # (model, task, seed) -> TrainResult: trains on the node's data (DDP when asked), refuses NaN
    decode: Callable  # () -> (the global state as numpy arrays, what the privacy mode kept of decoding it)

    @property
    def config(self):
        return self.task.config

    def train(self, model):
        """Train ``model`` on the node's data with this round's seed; its TrainResult."""
        return self.fit(model, self.task, self.seed)

    @cached_property
    def received(self) -> tuple[dict, Any]:
        """The global state, decoded by the privacy mode (only when the family reads it)."""
        return self.decode()

    @property
    def arrays(self) -> dict:
        return self.received[0]

    @property
    def decoded(self) -> Any:
        return self.received[1]


@dataclass
class LocalUpdate:
    """A node's update: what it sends before any privacy encoding, and how training went."""

    state: dict  # array name -> tensor
    result: Any  # fedlearn.training.TrainResult
    records: dict  # extra reply records (ifca: the cluster it trained)


_FAMILIES = Registry()
register, unregister, names, all_families, get, find = (
    _FAMILIES.register, _FAMILIES.unregister, _FAMILIES.names, _FAMILIES.entries, _FAMILIES.get, _FAMILIES.find)


def _restore(values: dict) -> Family:
    return _FAMILIES.restore(Family(**values))


def halves(name: str):
    """The hooks of strategy ``name``."""
    return get(name).halves()


def named(predicate: Callable[[Family], bool]) -> tuple[str, ...]:
    """The names of the families with a trait, for messages that list them."""
    return tuple(f.name for f in _FAMILIES.entries() if predicate(f))


def sum_strategies() -> tuple[str, ...]:
    return named(lambda f: f.aggregate == SUM and not f.needs_clear())


_CLIENT_STATE = (
    "part of what it trains lives on the clients (in their Flower context), not in the server's checkpoint, "
    "and a resumed run would restart it from scratch; start a new run"
)

for _family in (
    Family("fedavg"),
    Family("fedavgm"),
    Family("fedprox", keys=("proximal-mu",), checks="fedlearn.fedavg:fedprox_problems"),
    # Adaptive server optimizers (Reddi et al. 2021): a non-linear step on the average.
    Family("fedadam", aggregate=SERVER_STEP),
    Family("fedyogi", aggregate=SERVER_STEP),
    Family("fedadagrad", aggregate=SERVER_STEP),
    Family("fedmedian", aggregate=PER_UPDATE),
    Family("fedtrimmedavg", aggregate=PER_UPDATE),
    Family("krum", aggregate=PER_UPDATE, checks="fedlearn.fedavg:krum_problems"),
    Family(
        "ifca", hooks="fedlearn.ifca:IFCAFamily", keys=("clusters",), checks="fedlearn.ifca:config_problems",
        needs_clear_updates="each client picks the cluster model with the lowest loss and the server averages each "
        "cluster's updates apart, so it must see every update in clear and which cluster it belongs to",
        server_cannot_evaluate="the server holds several cluster models and no data to pick one per client",
    ),
    Family(
        "fedper", hooks="fedlearn.fedper:FedPerFamily", keys=("personal-layers",), checks="fedlearn.fedper:config_problems",
        server_cannot_evaluate="every client keeps its own last layers, so the server has no whole model to test",
        not_resumable=_CLIENT_STATE,
    ),
    Family(
        "fedmd", hooks="fedlearn.distillation:FedMDFamily", one_model=False,
        keys=("models", "public-size", "distill-epochs", "distill-lr", "consensus-temperature"),
        checks="fedlearn.distillation:config_problems",
        server_cannot_evaluate="every client owns its model and the server holds only their consensus on the public set",
        not_resumable=_CLIENT_STATE,
    ),
    Family(
        "multimodel", hooks="fedlearn.multimodel:MultiModelFamily", one_model=False, several_models=True,
        keys=("models", "models-per-client"), checks="fedlearn.multimodel:config_problems",
    ),
    Family(
        "fedbuff", hooks="fedlearn.fedbuff:FedBuffFamily", asynchronous=True,
        keys=("buffer-size", "staleness-exponent"), checks="fedlearn.fedbuff:config_problems",
        needs_clear_updates="it adds each update as it arrives, weighted by its staleness, while secure aggregation "
        "and he only ever reveal the sum of a fixed group of clients",
        not_resumable="the updates in flight and in its buffer are not in the checkpoint; start a new run",
    ),
):
    register(_family)
