"""The privacy seam is real: a mode defined and registered here alone, with its own server
wrapper and client half, runs a real Flower simulation through fedlearn's unchanged
ServerApp and ClientApp (server/app.py, clients/app.py and fedlearn/config.py are not touched)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clients.privacy import ClientHalf, clear_update
from fedlearn import privacy
from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError
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
    import json
    from pathlib import Path

    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "audit.jsonl").read_text().splitlines()]
    ends = [r for r in records if r["event"] == "round_end"]
    assert [r["data"]["privacy"] for r in ends] == [{"mode": "clear", "marked_updates": 3}] * 2
    assert [r["data"]["clients"] for r in ends] == [3, 3]
    assert not [r for r in records if r["event"] == "update_rejected"]
