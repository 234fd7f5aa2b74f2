"""The real deployment path, end to end on 127.0.0.1: Flower's own SuperLink (TLS, SuperNode
authentication), SuperNodes and `flwr run` as separate processes, driven by LocalCluster."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from crypto import certs
from fedlearn.config import RunConfig
from fedlearn.runs import printed_run_dir
from simulations.cluster import REFUSED_NODE, LocalCluster, wait_for_text
from tests.helpers import FEDLEARN, REPO, audit_records, cluster_processes, needs_openfhe


def run_on_three_nodes(tmp_path: Path, config: RunConfig) -> tuple[Path, list[dict]]:
    """Run ``config`` on a fresh three-SuperNode cluster, stop it, check nothing is left running;
    the run directory and its verified audit records."""
    directory = tmp_path / "cluster"
    cluster = LocalCluster(directory, 3, echo=lambda line: None)
    try:
        run_dir = cluster.submit(cluster.start(config))
    finally:
        cluster.stop()
    assert not cluster_processes(directory), "processes left running"
    return run_dir, audit_records(run_dir)


@pytest.mark.slow
def test_tls_node_auth_cluster_runs_a_round_and_refuses_an_unregistered_node(tmp_path):
    """One secagg round (several rounds between real SuperNodes: the fault and resume tests)."""
    directory = tmp_path / "cluster"
    config = RunConfig(num_rounds=1, min_available_clients=3, out_dir=str(tmp_path / "runs"))
    cluster = LocalCluster(directory, 3, echo=lambda line: None)
    try:
        config = cluster.start(config)
        # A SuperNode with a key nobody registered: the SuperLink refuses it, it exits.
        intruder = certs.generate_supernode_auth(tmp_path / "intruder", "intruder")
        refused = cluster.start_supernode(0, auth_key=intruder.private_key, name="intruder")
        assert refused.wait(60) != 0
        assert REFUSED_NODE in (directory / "intruder.log").read_text()
        wait_for_text(directory / "superlink.log", "No SuperNode found with the given public key", 10)
        run_dir = cluster.submit(config)
    finally:
        cluster.stop()
    assert not cluster_processes(directory), "processes left running"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [(m["round"], m["clients"], m["failures"]) for m in metrics] == [(0, 0, 0), (1, 3, 0)]
    assert metrics[-1]["accuracy"] > 0.5
    log = audit_records(run_dir)
    assert log[0]["data"]["config"]["privacy"] == "secagg"
    accepted = {r["data"]["node"] for r in log if r["event"] == "update_accepted" and r["data"]["kind"] == "train"}
    assert accepted == {"node-0", "node-1", "node-2"}
    assert log[-1]["event"] == "run_end" and log[-1]["data"]["status"] == "completed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["run_dir"] == str(run_dir)


@pytest.mark.slow
def test_he_threshold_holds_its_key_ceremony_between_real_supernodes(tmp_path):
    """Three SuperNode processes, each a keyholder: the ceremony's and the decryption's replies are
    signed by the nodes' keys and audited like updates, and the committee decrypts the round's sum
    (over several rounds: the simulation tests)."""
    needs_openfhe()
    config = RunConfig(num_rounds=1, min_available_clients=3, privacy="he-threshold", threshold_committee=3,
                       threshold_quorum=2, out_dir=str(tmp_path / "runs"))
    _, log = run_on_three_nodes(tmp_path, config)
    (ceremony,) = [r["data"] for r in log if r["event"] == "key_ceremony"]
    assert [m["partition"] for m in ceremony["members"]] == [0, 1, 2] and ceremony["quorum"] == 2
    keygens = {r["data"]["node"] for r in log if r["event"] == "update_accepted" and r["data"]["kind"] == "query.threshold_keygen"}
    assert keygens == {"node-0", "node-1", "node-2"}
    decrypted = [r for r in log if r["event"] == "update_accepted" and r["data"]["kind"] == "query.threshold_decrypt"]
    assert len(decrypted) == 3  # three members, one round
    ends = [r["data"] for r in log if r["event"] == "round_end"]
    assert [e["privacy"]["decrypted_by"] for e in ends] == [[0, 1, 2]] and ends[-1]["accuracy"] > 0.5
    assert log[-1]["data"]["status"] == "completed"


COLLABORATIVE = {
    # The heads stay in each SuperNode's context between the train and evaluate messages: lost,
    # a client would test the body with its seeded random head (about 10%). (The body's secure
    # aggregation is the simulation's test; here it would only add three exchanges a round.)
    "fedper": {"strategy": "fedper", "privacy": "plain", "num_rounds": 3, "partitioner": "dirichlet",
               "dirichlet_alpha": 0.1, "local_test_fraction": 0.2},
    # Push/pull over a real SuperLink instead of the synchronous exchange.
    "fedbuff": {"strategy": "fedbuff", "privacy": "plain", "num_rounds": 4, "buffer_size": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COLLABORATIVE))
def test_collaborative_strategies_run_between_real_supernodes(tmp_path, name):
    """The strategies whose state lives on the nodes (fedper) or that leave Flower's synchronous
    loop (fedbuff) also work between real SuperNode processes, every update signed and audited."""
    config = RunConfig(min_available_clients=3, out_dir=str(tmp_path / "runs"), **COLLABORATIVE[name])
    run_dir, log = run_on_three_nodes(tmp_path, config)
    assert not [r for r in log if r["event"] == "update_rejected"]
    accepted = {r["data"]["node"] for r in log if r["event"] == "update_accepted" and r["data"]["kind"] == "train"}
    assert accepted == {"node-0", "node-1", "node-2"}
    assert len([r for r in log if r["event"] == "round_end"]) == config.num_rounds
    assert log[-1]["event"] == "run_end" and log[-1]["data"]["status"] == "completed"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics[-1]["accuracy"] > (0.85 if name == "fedper" else 0.5)


@pytest.mark.slow
def test_local_cluster_command_prints_the_run_directory_last_and_stops_on_ctrl_c(tmp_path):
    out = tmp_path / "runs"
    command = [*FEDLEARN, "local-cluster", "--nodes", "2", "--out", str(out), "--run-config", "num-rounds=1 privacy=plain"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run_dir = printed_run_dir(done.stdout)
    assert (run_dir / "summary.json").exists() and run_dir.parent == out
    assert not cluster_processes(out)

    interrupted = subprocess.Popen([*command[:-1], "num-rounds=50 privacy=plain"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        for line in interrupted.stdout:
            if "fedlearn round 1" in line:
                break
        interrupted.send_signal(signal.SIGINT)
        assert interrupted.wait(60) == 130
    finally:
        interrupted.kill()
        deadline = time.monotonic() + 20
        while (left := cluster_processes(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for process in left:  # a failed test must not leave a 50-round cluster behind
            process.kill()
    assert not left, f"Ctrl-C left cluster processes running: {[p.pid for p in left]}"


def test_local_cluster_refuses_a_num_clients_that_contradicts_nodes(tmp_path, capsys):
    from simulations.cli import main as cli

    assert cli(["local-cluster", "--nodes", "2", "--out", str(tmp_path), "--run-config", "num-clients=3"]) == 2
    assert "num-clients=3 but --nodes 2: each SuperNode is one client, drop num-clients" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written or started


def test_enrolment_pins_a_relative_out_dir_to_where_the_user_is(tmp_path, monkeypatch):
    """The ServerApp runs in the SuperLink's directory; the run must still land under ./runs."""
    monkeypatch.chdir(tmp_path)
    config = LocalCluster(tmp_path / "cluster", 2).enrol(RunConfig(out_dir="runs"))
    assert config.out_dir == str(tmp_path / "runs")
    assert config.access_policy == str(tmp_path / "cluster" / "policy.toml") and config.num_clients == 2
