"""Faults of a real deployment on loopback: a SuperNode killed mid-round, one that stops
answering, and the ServerApp process killed and the run resumed on the same cluster."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from fedlearn.checkpoint import Checkpoint
from fedlearn.config import RunConfig
from simulations.cluster import LocalCluster
from tests.helpers import audit_records, cluster_processes

pytestmark = pytest.mark.slow


def wait_for_record(out: Path, event: str, server_round: int, submission: threading.Thread, seconds: float = 240) -> Path:
    """The run directory, once its audit log holds ``event`` for ``server_round``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert submission.is_alive(), f"the run ended before {event} of round {server_round}: {submission.error}"
        for log in out.glob("*/audit.jsonl"):
            for line in log.read_text().splitlines():
                if f'"event":"{event}"' in line and f'"round":{server_round},' in line:
                    return log.parent
        time.sleep(0.1)
    raise AssertionError(f"no {event} of round {server_round} within {seconds} s")


class Submission(threading.Thread):
    """`flwr run` in the background, so the test can break things while it runs."""

    def __init__(self, cluster: LocalCluster, config: RunConfig):
        super().__init__(daemon=True)
        self.cluster, self.config, self.run_dir, self.error = cluster, config, None, None

    def run(self) -> None:
        try:
            self.run_dir = self.cluster.submit(self.config)
        except Exception as exc:  # reported by the test
            self.error = exc


def test_a_killed_and_a_silent_supernode_do_not_stop_the_rounds(tmp_path):
    out = tmp_path / "runs"
    # The timeout bounds the silent node's round, but it must also cover round 1, where four
    # ClientApp processes start torch at once: 25 s was too short on a loaded 2-core CI machine.
    timeout = 60.0
    config = RunConfig(num_rounds=3, privacy="plain", min_available_clients=2, round_timeout=timeout, out_dir=str(out))
    cluster = LocalCluster(tmp_path / "cluster", 4, echo=lambda line: None)
    try:
        submission = Submission(cluster, cluster.start(config))
        submission.start()
        wait_for_record(out, "round_start", 2, submission)
        os.killpg(cluster.supernodes[3].pid, signal.SIGKILL)  # node-3 dies while round 2 trains
        wait_for_record(out, "round_start", 3, submission)
        os.killpg(cluster.supernodes[2].pid, signal.SIGSTOP)  # node-2 hangs: connected, never answers
        started = time.monotonic()
        submission.join(300)
        took = time.monotonic() - started
        assert submission.error is None, submission.error
        os.killpg(cluster.supernodes[2].pid, signal.SIGCONT)
    finally:
        cluster.stop()
    assert not cluster_processes(tmp_path / "cluster")
    run_dir = submission.run_dir
    metrics = {m["round"]: m for m in json.loads((run_dir / "metrics.json").read_text())}
    assert metrics[1]["clients"] == 4, "round 1 lost a node before any fault was injected"
    assert metrics[2]["clients"] == 3 and metrics[3]["clients"] <= 3
    assert took < timeout + 60, f"round 3 took {took:.0f}s: the silent node was not timed out"
    log = audit_records(run_dir)
    failed = [(r["round"], r["data"]["reason"]) for r in log if r["event"] == "node_failed"]
    assert any(server_round == 2 for server_round, _ in failed), failed
    assert any(server_round == 3 for server_round, _ in failed), failed
    accepted = {r["round"]: set() for r in log}
    for r in log:
        if r["event"] == "update_accepted" and r["data"]["kind"] == "train":
            accepted[r["round"]].add(r["data"]["node"])
    assert "node-3" not in accepted[2] and "node-3" not in accepted[3] and "node-2" not in accepted[3]
    assert log[-1]["data"]["status"] == "completed"


def serverapp_processes(cluster_dir: Path) -> list[psutil.Process]:
    return [p for p in cluster_processes(cluster_dir) if "flwr-serverapp" in " ".join(p.cmdline())]  # the ServerApp, not its SuperExec


def test_a_killed_serverapp_resumes_on_the_same_cluster_and_audit_chain(tmp_path):
    out = tmp_path / "runs"
    config = RunConfig(num_rounds=2, min_available_clients=3, out_dir=str(out))  # secagg, the default
    cluster = LocalCluster(tmp_path / "cluster", 3, echo=lambda line: None)
    try:
        signed = cluster.start(config)
        first = Submission(cluster, signed)
        first.start()
        run_dir = wait_for_record(out, "round_start", 2, first)
        servers = serverapp_processes(cluster.directory)
        assert servers, "no ServerApp process found"
        for process in servers:
            process.kill()  # the server dies mid-round; SuperLink and SuperNodes stay up
        first.join(20)  # `flwr run --stream` may keep waiting on a dead ServerApp; cluster.stop() ends it
        assert not (run_dir / "summary.json").exists()
        assert Checkpoint.load(run_dir).round == 1
        second = Submission(cluster, signed.replace(resume_from=str(run_dir)))
        second.run()
        assert second.error is None, second.error
    finally:
        cluster.stop()
    assert not cluster_processes(tmp_path / "cluster")
    assert second.run_dir == run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [(m["round"], m["clients"]) for m in metrics] == [(0, 0), (1, 3), (2, 3)]
    log = audit_records(run_dir)
    events = [r["event"] for r in log]
    assert events.count("run_start") == 1 and events.count("run_resumed") == 1
    assert [r["round"] for r in log if r["event"] == "round_end"] == [1, 2]
    assert log[-1]["data"]["status"] == "completed"
