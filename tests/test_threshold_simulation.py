"""privacy=he-threshold in real Flower simulations (real OpenFHE): the same model as plain within
the fixed-point bound, a key ceremony in the audit log, decryption after n - t key holders drop
out, and a loud, audited stop below the quorum."""

from __future__ import annotations

import numpy as np
import pytest

from crypto import signing, threshold
from fedlearn import models
from fedlearn.audit import read, verify
from fedlearn.config import RunConfig
from fedlearn.errors import RoundFailed
from fedlearn.runs import load_model
from tests.helpers import needs_openfhe, run_simulation

needs_openfhe()

CLIENTS = 5


def config(tmp_path, **overrides) -> RunConfig:
    flat = {"num-clients": CLIENTS, "num-rounds": 1, "out-dir": str(tmp_path), "seed": 7,
            "threshold-committee": 5, "threshold-quorum": 3}
    flat.update(overrides)
    return RunConfig.from_flat(flat)


def records(summary) -> list[dict]:
    return read(f"{summary['run_dir']}/audit.jsonl")


def round_end(summary, server_round=1) -> dict:
    (end,) = [r["data"] for r in records(summary) if r["event"] == "round_end" and r["round"] == server_round]
    return end


def max_diff(a, b) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)


def final_model(summary) -> dict[str, np.ndarray]:
    return load_model(f"{summary['run_dir']}/model.safetensors")


def audit_ok(summary) -> bool:
    return verify(f"{summary['run_dir']}/audit.jsonl", signing.load_public(f"{summary['run_dir']}/audit.pub")).ok


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    summary, _ = run_simulation(config(tmp_path_factory.mktemp("plain"), privacy="plain"))
    return summary


def test_he_threshold_equals_plain_and_the_server_tests_the_model(tmp_path, plain):
    summary, recorder = run_simulation(config(tmp_path, privacy="he-threshold"), record=True)
    facts = round_end(summary)["privacy"]
    assert facts["mode"] == "he-threshold" and facts["terms"] == CLIENTS
    assert facts["committee"] == 5 and facts["quorum"] == 3 and facts["decrypted_by"] == [0, 1, 2, 3, 4]
    assert facts["recovered_members"] == []
    assert max_diff(final_model(summary), final_model(plain)) <= facts["error_bound"]
    assert abs(summary["final_accuracy"] - plain["final_accuracy"]) <= 0.005  # tested on the server
    (ceremony,) = [r["data"] for r in records(summary) if r["event"] == "key_ceremony"]
    assert ceremony["committee"] == 5 and ceremony["quorum"] == 3 and len(ceremony["joint_public_key_digest"]) == 64
    assert [m["partition"] for m in ceremony["members"]] == [0, 1, 2, 3, 4]
    assert facts["joint_public_key_digest"] == ceremony["joint_public_key_digest"]
    assert audit_ok(summary)

    # Each training reply holds ciphertexts only: ~16 bytes per parameter, no float array.
    length = models.count_parameters(models.for_run(config(tmp_path)))
    trained = [m for m in recorder.received if m.metadata.message_type == "train"]
    assert len(trained) == CLIENTS
    for reply in trained:
        arrays = reply.content["arrays"]
        assert all(name.startswith("ct-") and a.dtype == "uint8" for name, a in arrays.items())
        assert len(arrays) == threshold.ciphertexts_for(length)
        assert sum(len(a.data) for a in arrays.values()) < 17 * threshold.SLOTS * len(arrays)


def test_a_quorum_decrypts_after_n_minus_t_key_holders_drop_out(tmp_path, plain):
    """Two of the five members vanish when asked to decrypt: the other three reveal their Shamir
    shares of the missing members' key shares, and the round's sum is that of all five clients."""
    summary, _ = run_simulation(config(tmp_path, privacy="he-threshold", **{"dropout-rate": 0.4, "dropout-stage": "decrypt"}))
    facts = round_end(summary)["privacy"]
    assert facts["injected_dropouts"] == 2 and len(facts["decrypted_by"]) == 3
    assert len(facts["recovered_now"]) == 2 and facts["recovered_members"] == facts["recovered_now"]
    assert facts["terms"] == CLIENTS
    assert max_diff(final_model(summary), final_model(plain)) <= facts["error_bound"]
    assert audit_ok(summary)


def test_below_the_quorum_the_run_stops_loudly_and_says_so_in_the_audit_log(tmp_path):
    cfg = config(tmp_path, privacy="he-threshold", **{"dropout-rate": 0.6, "dropout-stage": "decrypt"})
    with pytest.raises(RoundFailed, match="decryption needs 3 of the 5 key holders; 2 answered"):
        run_simulation(cfg)
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model.safetensors").exists()
    log = read(run_dir / "audit.jsonl")
    assert log[-1]["event"] == "run_end" and log[-1]["data"]["status"] == "failed"
    assert "decryption needs 3 of the 5 key holders" in log[-1]["data"]["reason"]
    assert sum(r["event"] == "node_failed" and r["data"]["kind"] == "query.threshold_decrypt" for r in log) == 3
    assert not any(r["event"] == "round_end" and r["round"] == 1 for r in log)
    assert verify(run_dir / "audit.jsonl", signing.load_public(run_dir / "audit.pub"), allow_incomplete=True).ok
    assert "status 'failed'" in verify(run_dir / "audit.jsonl", signing.load_public(run_dir / "audit.pub")).reason


@pytest.mark.slow
def test_a_server_optimizer_steps_from_the_decrypted_average(tmp_path):
    """The server holds the decrypted sum, so Flower's FedAdam runs on it: its first step is
    Lipschitz in the average with constant eta * 0.742 * 0.1 / tau (Flower's defaults)."""
    overrides = {"strategy": "fedadam", "server-lr": 0.01}
    reference, _ = run_simulation(config(tmp_path / "plain", privacy="plain", **overrides))
    ours, _ = run_simulation(config(tmp_path / "threshold", privacy="he-threshold", **overrides))
    bound = round_end(ours)["privacy"]["error_bound"]
    lipschitz = 0.01 * (0.0199**0.5 / 0.19) * 0.1 / 1e-3
    assert max_diff(final_model(ours), final_model(reference)) <= lipschitz * bound + 1e-6
    assert abs(ours["final_accuracy"] - reference["final_accuracy"]) <= 0.005
