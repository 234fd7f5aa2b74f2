"""Access control's cost: signing, verification and audit on the default job, with and without."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path

from simulations.bench.harness import record, scenario


@contextlib.contextmanager
def without_access_control():
    """The baseline arm of access-overhead, and nothing else: this process's server stops
    challenging, verifying and auditing (clients sign only when challenged, so they stop too).
    Not reachable from any config or command."""
    from fedlearn.audit import AuditLog
    from server.access import AccessGrid

    saved = AccessGrid.send_and_receive, AuditLog.append, AuditLog.sync
    AccessGrid.send_and_receive = lambda self, messages, *, timeout=None: self._grid.send_and_receive(messages, timeout=timeout)
    AuditLog.append = lambda self, *args, **kwargs: {}
    AuditLog.sync = lambda self: None
    try:
        yield
    finally:
        AccessGrid.send_and_receive, AuditLog.append, AuditLog.sync = saved


def _overhead_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=20, help="rounds per run (the default job has 10)")
    p.add_argument("--repeats", type=int, default=2, help="alternating with/without pairs")


@scenario("access-overhead", arguments=_overhead_args)
def access_overhead(args: argparse.Namespace) -> list[dict]:
    """Signing, verification and audit on the default job: their timed cost per round, and round
    time with and without them, in alternating runs in this process."""
    import statistics

    from rich.console import Console

    from fedlearn.config import RunConfig
    from simulations import simulate

    rounds: dict[str, list[dict]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as out:
        config = RunConfig.from_flat({"num-rounds": args.rounds, "out-dir": out, "privacy": "plain"})
        for repeat in range(args.repeats):
            for arm in ("on", "off"):
                print(f"[access-overhead] run {repeat + 1}/{args.repeats}, access control {arm} ...", flush=True)
                with open(os.devnull, "w") as quiet:
                    if arm == "on":
                        summary = simulate.run(config, console=Console(file=quiet))
                    else:
                        with without_access_control():
                            summary = simulate.run(config, console=Console(file=quiet))
                metrics = json.loads((Path(summary["run_dir"]) / "metrics.json").read_text())
                rounds[arm] += [m for m in metrics if m["round"] >= 2]  # round 1 includes Ray start-up
    on = [m["seconds"] for m in rounds["on"]]
    off = [m["seconds"] for m in rounds["off"]]
    costs = [m["verify_seconds"] + m["audit_seconds"] + m["sign_seconds"] for m in rounds["on"]]
    shares = [c / m["seconds"] * 100 for c, m in zip(costs, rounds["on"])]
    figures = {
        "clients": config.num_clients,
        "rounds_per_arm": len(on),
        "median_round_s_with": round(statistics.median(on), 4),
        "median_round_s_without": round(statistics.median(off), 4),
        "round_time_overhead_pct": round((statistics.median(on) / statistics.median(off) - 1) * 100, 2),
        "timed_cost_ms_per_round": round(statistics.median(costs) * 1000, 2),
        "verify_ms": round(statistics.median(m["verify_seconds"] for m in rounds["on"]) * 1000, 2),
        "audit_ms": round(statistics.median(m["audit_seconds"] for m in rounds["on"]) * 1000, 2),
        "sign_ms_slowest_node": round(statistics.median(m["sign_seconds"] for m in rounds["on"]) * 1000, 2),
        "timed_cost_pct_median": round(statistics.median(shares), 2),
        "timed_cost_pct_p90": round(sorted(shares)[int(0.9 * (len(shares) - 1))], 2),
    }
    print(f"    {json.dumps(figures)}", flush=True)
    return [record("access-overhead", figures, {"config": config.to_toml()})]
