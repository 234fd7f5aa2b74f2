"""Deployment: the same job as real processes on loopback (TLS, node auth) against simulation."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulations.bench.harness import REPO, record, scenario, simulate_once


def cluster_once(nodes: int, run_config: str, timeout: float = 3600) -> dict:
    """Run `fedlearn local-cluster` in a subprocess: the same job as real processes on loopback."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "simulations.cli", "local-cluster", "--nodes", str(nodes),
                   "--run-config", run_config, "--out", out]
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"local-cluster failed ({proc.returncode}) for {run_config!r}:\n{proc.stderr[-3000:]}")
        from fedlearn.runs import printed_run_dir

        run_dir = printed_run_dir(proc.stdout)
        return {
            "summary": json.loads((run_dir / "summary.json").read_text()),
            "metrics": json.loads((run_dir / "metrics.json").read_text()),
            "config": (run_dir / "config.toml").read_text(),
            "wall_seconds": round(time.perf_counter() - started, 2),
            "exchange_seconds": exchange_seconds(run_dir / "audit.jsonl"),
        }


def exchange_seconds(audit_path: Path) -> dict[str, float]:
    """Median seconds of each message exchange of a round (rounds 2 on), read from the audit
    log's timestamps: from the end of the previous exchange (or round_start) to the last reply."""
    from fedlearn.audit import read

    per_kind: dict[str, list[float]] = {}
    ends: dict[int, dict[str, float]] = {}
    starts: dict[int, float] = {}
    for record in read(audit_path):
        when = dt.datetime.fromisoformat(record["ts"]).timestamp()
        if record["event"] == "round_start":
            starts[record["round"]] = when
        elif record["event"] in ("update_accepted", "node_failed") and record["round"] >= 2:
            ends.setdefault(record["round"], {})[record["data"]["kind"]] = when
    for server_round, kinds in ends.items():
        previous = starts.get(server_round)
        for kind, end in sorted(kinds.items(), key=lambda item: item[1]):
            if previous is not None:
                per_kind.setdefault(kind, []).append(end - previous)
            previous = end
    return {kind: round(statistics.median(values), 2) for kind, values in per_kind.items()}


def median_round_seconds(metrics: list[dict]) -> float:
    """Median round time, leaving out round 0 (initial evaluation) and round 1 (start-up)."""
    later = [m["seconds"] for m in metrics if m["round"] > 1] or [m["seconds"] for m in metrics if m["round"] > 0]
    return round(statistics.median(later), 3)


def clientapp_start_seconds() -> float:
    """What a fresh ClientApp process pays before it can train: Python plus our imports."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import clients.app"], cwd=REPO, check=True)
    return round(time.perf_counter() - started, 2)


def _deploy_latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--privacy", default="plain,secagg", help="comma-separated privacy modes")


@scenario("deploy-latency", arguments=_deploy_latency_args)
def deploy_latency(args: argparse.Namespace) -> list[dict]:
    """Round latency of the same job as real processes on loopback (TLS, node auth) vs in simulation."""
    entries = []
    for privacy in args.privacy.split(","):
        cfg = f"num-rounds={args.rounds} privacy={privacy} min-available-clients={args.nodes}"
        print(f"[deploy-latency] {privacy}: simulation, then local-cluster with {args.nodes} nodes ...", flush=True)
        simulated = simulate_once(f"{cfg} num-clients={args.nodes}")
        deployed = cluster_once(args.nodes, cfg)
        sim_round, real_round = median_round_seconds(simulated["metrics"]), median_round_seconds(deployed["metrics"])
        figures = {
            "privacy": privacy,
            "nodes": args.nodes,
            "rounds": args.rounds,
            "simulation_round_seconds": sim_round,
            "deployment_round_seconds": real_round,
            "deployment_over_simulation": round(real_round / sim_round, 1),
            "simulation_wall_seconds": simulated["wall_seconds"],
            "deployment_wall_seconds": deployed["wall_seconds"],  # includes certificates, keys, process start
            "deployment_exchange_seconds": deployed["exchange_seconds"],  # per message exchange of a round
            "clientapp_start_seconds": clientapp_start_seconds(),
            "simulation_accuracy": simulated["summary"]["final_accuracy"],
            "deployment_accuracy": deployed["summary"]["final_accuracy"],
        }
        print(f"    {json.dumps(figures)}", flush=True)
        entries.append(record("deploy-latency", figures, deployed))
    return entries
