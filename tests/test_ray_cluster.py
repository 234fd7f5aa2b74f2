"""A simulation on an existing Ray cluster: a head and a worker node started with `ray start` on
this machine, `fedlearn simulate` attached to it with ray-address (docs/scale.md)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from fedlearn.runs import printed_run_dir
from tests.helpers import ENV, FEDLEARN, run_command

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster(address: str) -> dict:
    """The cluster's alive nodes and the command lines of the drivers (jobs) that connected to it."""
    probe = ("import json, ray; from ray._private.state import state; ray.init(address=%r, logging_level='ERROR'); "
             "print(json.dumps({'nodes': sum(1 for n in ray.nodes() if n['Alive']), "
             "'jobs': [j.get('Entrypoint', '') for j in state.job_table()]}))") % address
    result = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not result.stdout.strip():
        return {"nodes": 0, "jobs": []}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _stop(processes: list[subprocess.Popen], temp_dir: str) -> None:
    """Stop the two `ray start --block` processes and every process of their nodes (found by the
    cluster's own temp directory in their command lines), whatever session they moved to."""
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        if not left:
            return
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(0.5)
    raise AssertionError(f"Ray processes of {temp_dir} still running after 30 s")


@pytest.mark.slow
def test_a_simulation_runs_its_clients_on_the_worker_node_of_a_two_node_ray_cluster(tmp_path):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    common = ["--block", "--include-dashboard=false", "--disable-usage-stats"]
    processes: list[subprocess.Popen] = []
    try:
        # The head offers no CPU: every ClientApp actor must run on the worker node.
        processes.append(subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--num-cpus=0", f"--temp-dir={temp_dir}",
                                           *common], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        deadline = time.monotonic() + 120
        while _cluster(address)["nodes"] < 1:
            assert time.monotonic() < deadline, "the Ray head did not start within 120 s"
            time.sleep(2)
        processes.append(subprocess.Popen([RAY, "start", f"--address={address}", "--num-cpus=2", *common[:1]],
                                          env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        while _cluster(address)["nodes"] < 2:
            assert time.monotonic() < deadline, "the Ray worker node did not join within 120 s"
            time.sleep(2)
        result = run_command([*FEDLEARN, "simulate", "--run-config",
                              f"num-clients=4 num-rounds=2 privacy=plain ray-address={address}", "--out", str(tmp_path),
                              "--verbose"], timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        run_dir = printed_run_dir(result.stdout)
        assert "round   2" in result.stdout and (run_dir / "model.safetensors").is_file()
        # The simulation's driver joined the cluster (the cluster lists it as a job) rather than
        # starting a Ray runtime of its own; its clients could only run on the worker node's CPUs.
        assert "Connecting to existing Ray cluster at address" in result.stderr
        assert any("simulate" in job and f"ray-address={address}" in job for job in _cluster(address)["jobs"])
    finally:
        _stop(processes, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not os.path.exists(temp_dir)
