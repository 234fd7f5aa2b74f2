import json
import subprocess
import sys

import pytest
from flwr.app import ArrayRecord

from simulations import bench


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    return tmp_path


def test_tree_memory_sees_child_processes():
    # A parent that starts a child holding ~200 MiB: the tree peak must include the child.
    code = (
        "import subprocess, sys; subprocess.run([sys.executable, '-c', "
        "\"b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(1.5)\"])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    with bench.TreeMemory(proc.pid, interval=0.05) as memory:
        proc.wait()
    assert memory.peak > 200 * 2**20


def test_scale_scenario_appends_a_record(results_dir):
    args = bench.build_parser().parse_args(["fedavg-scale", "--clients", "3", "--rounds", "2"])
    entries = bench.SCENARIOS["fedavg-scale"][0](args)
    lines = (results_dir / "fedavg-scale.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == entries[0]
    figures = entries[0]["figures"]
    assert figures["clients"] == 3 and figures["rounds"] == 2
    assert figures["peak_rss_mib"] > 100 and figures["mean_round_seconds_after_first"] > 0
    assert {"torch", "flwr", "cpus", "commit"} <= set(entries[0]["machine"])
    table = bench.report("fedavg-scale")
    assert "| clients |" in table and "| 3 | 2 |" in table


def test_report_without_results(results_dir):
    assert "no results recorded" in bench.report("fedavg-scale")


def test_access_overhead_baseline_switch_is_scoped(tmp_path):
    """The benchmark's baseline arm passes messages through unsigned and writes no audit
    records, and everything is back in force when it ends."""
    from crypto import signing
    from fedlearn.audit import AuditLog
    from server.access import AccessGrid

    class Echo:
        def send_and_receive(self, messages, *, timeout=None):
            return list(messages)

    original = AccessGrid.send_and_receive, AuditLog.append, AuditLog.sync
    log = AuditLog(tmp_path / "audit.jsonl", signing.generate(), "run")
    grid = AccessGrid(Echo(), policy=None, audit=log, run_id="run", model=ArrayRecord())
    with bench.without_access_control():
        assert grid.send_and_receive(["untouched"]) == ["untouched"]
        log.append("run_start", 0, {})
    assert (tmp_path / "audit.jsonl").read_bytes() == b""
    assert (AccessGrid.send_and_receive, AuditLog.append, AuditLog.sync) == original
    log.append("run_start", 0, {})
    assert (tmp_path / "audit.jsonl").read_bytes().count(b"\n") == 1
