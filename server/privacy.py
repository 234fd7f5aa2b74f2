"""The server half of a privacy mode: a strategy wrapper, as Flower wraps a strategy for
differential privacy (``DifferentialPrivacyServerSideFixedClipping(strategy)``).

The wrapped Flower strategy (``inner``) samples, configures and takes the server step; the
wrapper changes what travels and what the inner strategy is given, and answers the run's
questions about the mode: is this reply well formed, what goes into the audit log, can a
checkpoint hold its state, how is the final model saved. ``PrivacyStrategy`` itself is
privacy=plain: updates travel in clear and pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlearn import privacy
from fedlearn.audit import AuditLog
from fedlearn.config import RunConfig
from fedlearn.runs import RunStore

UpdateCheck = Callable[[RecordDict], None]


class PrivacyStrategy(Strategy):
    """privacy=plain, and the base of every mode's wrapper."""

    checkpointable = True  # its state, and the model, are in clear on the server
    transparent = True  # messages pass unchanged: the inner strategy may run its own loop (fedbuff's is asynchronous)

    def __init__(self, inner: Strategy, config: RunConfig, template: dict[str, np.ndarray]):
        self.inner, self.config, self.template = inner, config, template
        self.check_update: UpdateCheck | None = None  # the strategy's own check of a clear update

    # -- before the run ------------------------------------------------------------------
    @classmethod
    def preflight(cls, config: RunConfig) -> None:
        """Raise ConfigError for what this mode lacks (keys, libraries) before the run directory exists."""

    @classmethod
    def provision(cls, config: RunConfig, directory: Path) -> RunConfig:
        """Create what a simulation needs in the run directory (he: a key pair); returns the config to run."""
        return config

    def prepare(self, grid: Grid, audit: AuditLog) -> None:
        """Before round 1, with the nodes connected (he-threshold: the key ceremony)."""

    # -- Flower's Strategy: the inner strategy's, unless a mode changes it ----------------
    def start(self, **kwargs):
        if self.transparent:
            return self.inner.start(**kwargs)
        return super().start(**kwargs)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    # -- what the run asks of the mode ---------------------------------------------------
    def check_reply(self, content: RecordDict) -> None:
        """Raise ValueError saying what is wrong with a training reply (access control calls it
        on every reply before anything is aggregated). In clear: the strategy's own check."""
        if self.check_update is not None:
            self.check_update(content)

    def round_facts(self, update_digests: list[str]) -> dict:
        """What the audit log's round_end says of this round's privacy."""
        return {"mode": self.config.privacy}

    def save_model(self, store: RunStore, arrays: dict[str, np.ndarray]) -> Path:
        return store.save_model(arrays)


class HidingStrategy(PrivacyStrategy):
    """A mode that hides each update from the server: its replies are its own wire format,
    checked by the mode, and its facts of the last aggregation (``last``) go to the audit log."""

    transparent = False  # its own configure/aggregate steps must run in Flower's loop

    def __init__(self, inner: Strategy, config: RunConfig, template: dict[str, np.ndarray]):
        super().__init__(inner, config, template)
        self.last: dict = {}

    def check_reply(self, content: RecordDict) -> None:
        raise NotImplementedError

    def round_facts(self, update_digests: list[str]) -> dict:
        return {**self.last, "update_digests": update_digests}


def strategy_class(config: RunConfig) -> type[PrivacyStrategy]:
    """The run's privacy mode's server half."""
    return privacy.get(config.privacy).server_class()


def preflight(config: RunConfig) -> None:
    """What the run's privacy mode needs, checked before the run directory exists (ConfigError)."""
    strategy_class(config).preflight(config)


def innermost(strategy: Strategy) -> Strategy:
    """The Flower strategy under every wrapper: ours (``inner``) and Flower's DP wrappers (``strategy``)."""
    while True:
        inner = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
        if not isinstance(inner, Strategy):
            return strategy
        strategy = inner
