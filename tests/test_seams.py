"""The seams are real: a privacy mode, and a strategy family, each defined and registered here
alone (a mode: its server wrapper and client half; a family: both halves of a strategy), run a
real Flower simulation through fedlearn's unchanged ServerApp and ClientApp (server/app.py,
clients/app.py and fedlearn/config.py are not touched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.serverapp.strategy import FedAvg
from flwr.app import ConfigRecord, RecordDict

from clients.privacy import ClientHalf, clear_update
from fedlearn import families, privacy
from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError
from fedlearn.families import LocalUpdate
from fedlearn.fedavg import FedAvgFamily
from server.privacy import PrivacyStrategy
from tests.helpers import run_simulation

MARK = "clear"  # the record every update of the toy mode carries


class ClearStrategy(PrivacyStrategy):
    """The toy mode's server half: refuses updates without its mark, says so in the audit log."""

    def check_reply(self, content: RecordDict) -> None:
        if MARK not in content:
            raise ValueError("no clear record: not a clear-mode update")
        super().check_reply(content)

    def round_facts(self, update_digests: list[str]) -> dict:
        return {"mode": "clear", "marked_updates": len(update_digests)}


def marked_update(msg, context, task, received, state, num_examples) -> dict:
    """The toy mode's client half: the update in clear, plus its mark."""
    return {**clear_update(msg, context, task, received, state, num_examples), MARK: ConfigRecord({"by": task.partition_id})}


def problems(config) -> list[str]:
    return [] if config.num_clients <= 8 else ["privacy=clear is a toy: at most 8 clients"]


CLEAR = privacy.PrivacyMode("clear", server=ClearStrategy, client=ClientHalf(encode=marked_update), checks=problems,
                            sees_updates=True, summary="a test's toy mode")


@pytest.fixture
def clear_mode():
    privacy.register(CLEAR)
    yield CLEAR
    privacy.unregister(CLEAR.name)


def test_a_mode_registered_outside_fedlearn_is_validated_by_its_own_checks(clear_mode):
    RunConfig.from_flat({"privacy": "clear", "num-clients": 4})
    with pytest.raises(ConfigError, match="privacy=clear is a toy"):
        RunConfig.from_flat({"privacy": "clear", "num-clients": 9})
    privacy.unregister("clear")
    with pytest.raises(ConfigError, match="privacy='clear': choose one of"):
        RunConfig.from_flat({"privacy": "clear", "num-clients": 4})


def test_a_toy_privacy_mode_runs_a_real_flower_simulation(clear_mode, tmp_path):
    from clients.app import make_client_app

    config = RunConfig.from_flat({"privacy": "clear", "num-clients": 3, "num-rounds": 2, "model": "logreg",
                                  "out-dir": str(tmp_path)})
    summary, _ = run_simulation(config, client_app=make_client_app())  # the app carries the registered modes
    assert summary["privacy"] == "clear" and summary["final_accuracy"] > 0.5
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "audit.jsonl").read_text().splitlines()]
    ends = [r for r in records if r["event"] == "round_end"]
    assert [r["data"]["privacy"] for r in ends] == [{"mode": "clear", "marked_updates": 3}] * 2
    assert [r["data"]["clients"] for r in ends] == [3, 3]
    assert not [r for r in records if r["event"] == "update_rejected"]


# -- a strategy family defined here alone -------------------------------------------------
TOY_RECORD = "toy"


class CountingFedAvg(FedAvg):
    """The toy family's server strategy: FedAvg that remembers how many updates each round averaged."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.averaged: dict[int, int] = {}

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.averaged[server_round] = len(replies)
        return super().aggregate_train(server_round, replies)


class ToyFamily(FedAvgFamily):
    """Both halves of a toy family: clients mark each update; the server refuses unmarked ones
    and writes how many it averaged into the audit log and the metrics."""

    def build(self, config, **common):
        return CountingFedAvg(**common)

    def update_check(self, config, strategy, template):
        plain = super().update_check(config, strategy, template)

        def check(content):
            plain(content)
            if TOY_RECORD not in content:
                raise ValueError("an update of the toy family without its mark")
        return check

    def round_facts(self, config, strategy, server_round):
        count = strategy.averaged.get(server_round, 0)
        return {"toy": {"averaged": count}}, {"toy_averaged": count}

    def client_update(self, local):
        update = super().client_update(local)
        return LocalUpdate(update.state, update.result, {TOY_RECORD: ConfigRecord({"by": local.task.partition_id})})


def toy_problems(config) -> list[str]:
    return [] if config.num_clients <= 8 else ["strategy=toy is a toy: at most 8 clients"]


TOY = families.Family("toy", hooks=ToyFamily, checks=toy_problems)


@pytest.fixture
def toy_family():
    families.register(TOY)
    yield TOY
    families.unregister(TOY.name)


def test_a_family_registered_outside_fedlearn_is_validated_by_its_own_checks(toy_family):
    RunConfig.from_flat({"strategy": "toy", "num-clients": 4})
    with pytest.raises(ConfigError, match="strategy=toy is a toy"):
        RunConfig.from_flat({"strategy": "toy", "num-clients": 9})
    families.unregister("toy")
    with pytest.raises(ConfigError, match="strategy='toy': choose one of"):
        RunConfig.from_flat({"strategy": "toy", "num-clients": 4})


@pytest.mark.parametrize("mode", ["plain", "secagg"])
def test_a_toy_strategy_family_runs_a_real_flower_simulation(toy_family, mode, tmp_path):
    """Under plain and under the default secure aggregation: the family's halves compose with any
    privacy mode that can compute what it aggregates."""
    from clients.app import make_client_app

    config = RunConfig.from_flat({"strategy": "toy", "privacy": mode, "num-clients": 3, "num-rounds": 2,
                                  "model": "logreg", "out-dir": str(tmp_path)})
    summary, _ = run_simulation(config, client_app=make_client_app())  # the app carries the registered families
    assert summary["strategy"] == "toy" and summary["final_accuracy"] > 0.5
    directory = Path(summary["run_dir"])
    records = [json.loads(line) for line in (directory / "audit.jsonl").read_text().splitlines()]
    ends = [r["data"] for r in records if r["event"] == "round_end"]
    assert [end["toy"] for end in ends] == [{"averaged": 1 if mode == "secagg" else 3}] * 2  # secagg: one sum
    assert not [r for r in records if r["event"] == "update_rejected"]
    rounds = json.loads((directory / "metrics.json").read_text())
    assert [r["toy_averaged"] for r in rounds if r["round"]] == [end["toy"]["averaged"] for end in ends]
