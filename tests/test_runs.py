import json

import numpy as np
import pytest

from fedlearn.config import RunConfig
from fedlearn.runs import RoundRecord, RunStore, client_drift, load_model


def test_run_directory_contents(tmp_path):
    config = RunConfig.from_flat({"out-dir": str(tmp_path), "num-rounds": 2})
    store = RunStore.create(config, "run-a")
    assert (tmp_path / "run-a" / "config.toml").is_file()
    for r in range(3):
        store.add_round(RoundRecord(r, 0.1 + 0.3 * r, 2.0 - r, 0.5, 100 * r, 110 * r, 3, 0, extra={"train_loss": 1.0}))
    metrics = json.loads((store.directory / "metrics.json").read_text())
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert {"round", "accuracy", "loss", "seconds", "bytes_up", "bytes_down", "train_loss"} <= set(metrics[1])
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(2, dtype=np.float32)}
    store.save_model(state)
    summary = store.finish(12.5)
    for key in ("run_id", "strategy", "privacy", "rounds", "final_accuracy", "total_seconds"):
        assert key in summary
    assert summary["rounds"] == 2 and summary["final_accuracy"] == pytest.approx(0.7)
    assert json.loads((store.directory / "summary.json").read_text()) == summary
    loaded = load_model(store.directory / "model.safetensors")
    assert np.array_equal(loaded["w"], state["w"])
    png = (store.directory / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert not list(store.directory.glob(".*tmp*")), "temporary files left behind"


def test_existing_run_is_never_overwritten(tmp_path):
    config = RunConfig.from_flat({"out-dir": str(tmp_path)})
    RunStore.create(config, "same")
    (tmp_path / "same" / "metrics.json").write_text("[]")
    with pytest.raises(FileExistsError):
        RunStore.create(config, "same")
    assert (tmp_path / "same" / "metrics.json").read_text() == "[]"


def test_client_drift_is_named_with_the_keys_to_lower_only_when_the_global_model_stays_near_chance():
    """Issue 23: `dataset=mnist model=mnist-2nn num-clients=5 num-rounds=2` ended at test accuracy
    0.10 while the clients' own training accuracy reached 0.62, and nothing said so."""

    config = RunConfig.from_flat({"lr": 0.05, "local-epochs": 2, "optimizer": "momentum", "momentum": 0.9})

    def history(*rounds):
        return [RoundRecord(i, acc, 2.0, 1.0, 0, 0, extra={"train_accuracy": train}) for i, (acc, train) in enumerate(rounds, 1)]

    drifted = client_drift(history((0.12, 0.57)), 10, config)  # what that run's round 1 measured here
    assert drifted.startswith("client drift: after round 1 the global model's test accuracy is 0.12, near chance (0.10)")
    assert "lower lr (now 0.05), local-epochs (now 2), momentum (now 0.9), or raise batch-size (now 16)" in drifted
    assert "after round 2" in client_drift(history((0.10, 0.40), (0.10, 0.62)), 10, config)
    assert client_drift([RoundRecord(0, 0.1, 2.3, 0.0, 0, 0)], 10, config) is None  # the initial model
    assert client_drift(history((0.80, 0.85), (0.90, 0.92)), 10, config) is None  # learning
    assert client_drift(history((0.10, 0.12), (0.11, 0.13)), 10, config) is None  # nobody learns: not drift
    assert client_drift([RoundRecord(2, 0.1, 2.0, 1.0, 0, 0)], 10, config) is None  # no training accuracy reported
