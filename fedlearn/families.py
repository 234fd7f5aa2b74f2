"""What each strategy is, in one table: how it aggregates, what it needs to see, what it cannot do.

Config checks, the server and the clients read these traits instead of lists of strategy names,
so a new strategy is one row here (plus its module, when it is one of ours).
"""

from __future__ import annotations

from dataclasses import dataclass

# How a strategy turns the updates into the next global model.
SUM = "sum"  # an example-weighted average: every privacy mode can compute it
SERVER_STEP = "server-step"  # the average, then a non-linear server step: the aggregate must be in clear
PER_UPDATE = "per-update"  # each update in clear (median, trimmed mean, Krum): only privacy=plain


@dataclass(frozen=True)
class Family:
    name: str
    aggregate: str = SUM
    needs_clear_updates: str = ""  # why it needs each update in clear beyond its aggregate kind ("": it does not)
    server_cannot_evaluate: str = ""  # why the server cannot test what it trains ("": it can)
    not_resumable: str = ""  # why a run of it cannot resume from a checkpoint ("": it can)
    one_model: bool = True  # a client trains one model per round (so its local epochs can be a DDP job)
    several_models: bool = False  # the run trains several named models (``models``), each evaluated and saved

    def needs_clear(self) -> bool:
        return self.aggregate == PER_UPDATE or bool(self.needs_clear_updates)


_CLIENT_STATE = (
    "part of what it trains lives on the clients (in their Flower context), not in the server's checkpoint, "
    "and a resumed run would restart it from scratch; start a new run"
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("fedavg"),
        Family("fedavgm"),
        Family("fedprox"),
        # Adaptive server optimizers (Reddi et al. 2021): a non-linear step on the average.
        Family("fedadam", SERVER_STEP),
        Family("fedyogi", SERVER_STEP),
        Family("fedadagrad", SERVER_STEP),
        Family("fedmedian", PER_UPDATE),
        Family("fedtrimmedavg", PER_UPDATE),
        Family("krum", PER_UPDATE),
        Family(
            "ifca",
            needs_clear_updates="each client picks the cluster model with the lowest loss and the server averages each "
            "cluster's updates apart, so it must see every update in clear and which cluster it belongs to",
            server_cannot_evaluate="the server holds several cluster models and no data to pick one per client",
        ),
        Family(
            "fedper",
            server_cannot_evaluate="every client keeps its own last layers, so the server has no whole model to test",
            not_resumable=_CLIENT_STATE,
        ),
        Family(
            "fedmd", one_model=False,
            server_cannot_evaluate="every client owns its model and the server holds only their consensus on the public set",
            not_resumable=_CLIENT_STATE,
        ),
        Family("multimodel", one_model=False, several_models=True),
        Family(
            "fedbuff",
            needs_clear_updates="it adds each update as it arrives, weighted by its staleness, while secure aggregation "
            "and he only ever reveal the sum of a fixed group of clients",
            not_resumable="the updates in flight and in its buffer are not in the checkpoint; start a new run",
        ),
    )
}
STRATEGIES = tuple(FAMILIES)
SUM_STRATEGIES = tuple(n for n, f in FAMILIES.items() if f.aggregate == SUM and not f.needs_clear())
PER_UPDATE_STRATEGIES = tuple(n for n, f in FAMILIES.items() if f.aggregate == PER_UPDATE)


def get(name: str) -> Family:
    return FAMILIES[name]
