"""privacy=secagg in real Flower simulations: the same model as plain within the stated bound,
with dropouts at every stage above the threshold; a loud, audited stop below it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crypto import signing
from fedlearn import models
from fedlearn.audit import read, verify
from fedlearn.config import RunConfig
from fedlearn.errors import RoundFailed
from fedlearn.runs import load_model
from fedlearn.secagg import MASKED_ARRAY
from tests.helpers import run_simulation

CLIENTS = 5


def config(tmp_path, **overrides) -> RunConfig:
    flat = {"num-clients": CLIENTS, "num-rounds": 1, "out-dir": str(tmp_path), "seed": 7}
    flat.update(overrides)
    return RunConfig.from_flat(flat)


def final_model(summary) -> dict[str, np.ndarray]:
    return load_model(f"{summary['run_dir']}/model.safetensors")


def round_end(summary, server_round=1) -> dict:
    records = read(f"{summary['run_dir']}/audit.jsonl")
    (end,) = [r["data"] for r in records if r["event"] == "round_end" and r["round"] == server_round]
    return end


def max_diff(a, b) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)


def audit_ok(summary) -> bool:
    return verify(f"{summary['run_dir']}/audit.jsonl", signing.load_public(f"{summary['run_dir']}/audit.pub")).ok


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Plain references: every client, and the same seeded fifth of them dropped at training."""
    out = tmp_path_factory.mktemp("plain")
    full, _ = run_simulation(config(out / "full"))
    dropped, _ = run_simulation(config(out / "dropped", **{"dropout-rate": 0.2}))
    return {"full": full, "dropped": dropped}


def test_secagg_equals_plain_within_the_stated_bound_and_uploads_two_bytes_per_parameter(tmp_path, plain):
    summary, recorder = run_simulation(config(tmp_path, privacy="secagg"), record=True)
    facts = round_end(summary)["privacy"]
    assert facts["mode"] == "secagg" and facts["terms"] == CLIENTS and facts["bits"] == 16
    assert max_diff(final_model(summary), final_model(plain["full"])) <= facts["error_bound"]
    assert abs(summary["final_accuracy"] - plain["full"]["final_accuracy"]) <= 0.005
    assert audit_ok(summary)

    # What the server received for training: one 16-bit masked vector per client, no float array.
    length = models.count_parameters(models.for_run(config(tmp_path)))
    trained = [m for m in recorder.received if m.metadata.message_type == "train"]
    assert len(trained) == CLIENTS
    for reply in trained:
        (array,) = reply.content["arrays"].values()
        assert array.dtype == "uint16" and list(array.shape) == [length]
        assert len(array.data) <= 2 * length + 128  # 2 bytes per parameter, plus the .npy header
    # Everything else uploaded (keys, sealed shares, signatures, metrics) does not grow with the model.
    metrics = json.loads(open(f"{summary['run_dir']}/metrics.json").read())
    overhead = metrics[-1]["bytes_up"] - sum(len(r.content["arrays"][MASKED_ARRAY].data) for r in trained)
    assert overhead / CLIENTS < 4096


# Each stage's dropouts are also tested without Flower (tests/test_secagg_protocol.py); here the
# default suite runs one stage end to end (unmask) and the slow suite the others.
@pytest.mark.parametrize("stage", [pytest.param("advertise", marks=pytest.mark.slow), pytest.param("share", marks=pytest.mark.slow),
                                   pytest.param("train", marks=pytest.mark.slow), "unmask"])
def test_dropouts_above_the_threshold_give_the_survivors_sum(tmp_path, plain, stage):
    """One of five clients vanishes at ``stage``: the round still aggregates exactly the clients
    that sent masked inputs (all five when the dropout comes after, at unmasking)."""
    summary, _ = run_simulation(config(tmp_path, privacy="secagg", **{"dropout-rate": 0.2, "dropout-stage": stage}))
    facts = round_end(summary)["privacy"]
    assert facts["injected_dropouts"] == 1 and facts["dropped"][stage] == 1
    reference = plain["full"] if stage == "unmask" else plain["dropped"]
    assert facts["terms"] == (CLIENTS if stage == "unmask" else CLIENTS - 1)
    assert max_diff(final_model(summary), final_model(reference)) <= facts["error_bound"]
    assert audit_ok(summary)


@pytest.mark.parametrize("stage", [pytest.param("advertise", marks=pytest.mark.slow), "train",
                                   pytest.param("unmask", marks=pytest.mark.slow)])
def test_below_the_threshold_the_run_stops_loudly_and_says_so_in_the_audit_log(tmp_path, stage):
    # Five clients, threshold 3: three vanish, two are left.
    cfg = config(tmp_path, privacy="secagg", **{"dropout-rate": 0.6, "dropout-stage": stage})
    with pytest.raises(RoundFailed, match="fewer than the threshold 3|could not be removed"):
        run_simulation(cfg)
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model.safetensors").exists()
    records = read(run_dir / "audit.jsonl")
    assert records[-1]["event"] == "run_end" and records[-1]["data"]["status"] == "failed"
    assert "threshold" in records[-1]["data"]["reason"] or "could not be removed" in records[-1]["data"]["reason"]
    assert verify(run_dir / "audit.jsonl", signing.load_public(run_dir / "audit.pub"), allow_incomplete=True).ok
    assert "status 'failed'" in verify(run_dir / "audit.jsonl", signing.load_public(run_dir / "audit.pub")).reason
    assert not any(r["event"] == "round_end" and r["round"] == 1 for r in records)


@pytest.mark.parametrize("strategy", [pytest.param("fedavgm", marks=pytest.mark.slow), "fedadam"])
def test_server_optimizers_step_from_the_unmasked_average(tmp_path, strategy):
    """The server learns the aggregate, so Flower's own server step runs on it: one round of
    fedavgm (lr 1) lands on the average itself; fedadam's first step is Lipschitz in the average
    with constant eta * 0.742 * 0.1 / tau (Flower's defaults: beta1 0.9, beta2 0.99, tau 1e-3)."""
    overrides = {"strategy": strategy, "server-lr": 1.0 if strategy == "fedavgm" else 0.01}
    reference, _ = run_simulation(config(tmp_path / "plain", **overrides))
    secure, _ = run_simulation(config(tmp_path / "secagg", privacy="secagg", **overrides))
    bound = round_end(secure)["privacy"]["error_bound"]
    lipschitz = 1.0 if strategy == "fedavgm" else 0.01 * (0.0199**0.5 / 0.19) * 0.1 / 1e-3
    assert max_diff(final_model(secure), final_model(reference)) <= lipschitz * bound + 1e-6
    assert abs(secure["final_accuracy"] - reference["final_accuracy"]) <= 0.005
