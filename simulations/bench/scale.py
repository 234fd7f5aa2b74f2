"""Scale: plain FedAvg as the number of clients grows, and 100,000 simulated users beside
Flower's own simulation."""

from __future__ import annotations

import argparse
import json

from simulations.bench.harness import record, scenario, simulate_once, stock_flower_once


def _scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", default="10,100,1000", help="comma-separated client counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="logreg")


@scenario("fedavg-scale", arguments=_scale_args)
def fedavg_scale(args: argparse.Namespace) -> list[dict]:
    """Plain FedAvg round time and peak memory for growing numbers of simulated clients."""
    entries = []
    for clients in [int(c) for c in args.clients.split(",")]:
        cfg = (
            f"num-clients={clients} num-rounds={args.rounds} fraction-train=1.0 local-epochs=1 "
            f"dataset=digits model={args.model} min-available-clients={clients} privacy=plain"
        )
        print(f"[fedavg-scale] {clients} clients, {args.rounds} rounds ...", flush=True)
        run = simulate_once(cfg)
        rounds = [m for m in run["metrics"] if m["round"] > 0]
        later = [m["seconds"] for m in rounds[1:]] or [rounds[0]["seconds"]]
        figures = {
            "clients": clients,
            "rounds": len(rounds),
            "model": args.model,
            "parameters": run["summary"]["parameters"],
            "first_round_seconds": rounds[0]["seconds"],  # includes Ray and actor start-up
            "mean_round_seconds_after_first": round(sum(later) / len(later), 3),
            "peak_rss_mib": run["peak_rss_mib"],
            "wall_seconds": run["wall_seconds"],
            "bytes_up_per_round": rounds[-1]["bytes_up"],
            "final_accuracy": run["summary"]["final_accuracy"],
        }
        print(f"    {json.dumps(figures)}", flush=True)
        entries.append(record("fedavg-scale", figures, run))
    return entries


def _users_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", default="1000,10000,100000", help="comma-separated client counts (users)")
    p.add_argument("--sampled", type=int, default=100, help="clients sampled to train each round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--stock-flower", type=int, default=100_000, metavar="CLIENTS",
                   help="also run Flower's own simulation of the job with this many clients, as the reference (0: skip)")


def _steady(seconds: list[float]) -> float:
    """The median round time after the first (which carries the runtime's start-up)."""
    later = sorted(seconds[1:]) or seconds
    return round(later[len(later) // 2], 3)


@scenario("users-scale", arguments=_users_args)
def users_scale(args: argparse.Namespace) -> list[dict]:
    """100,000 simulated users with 100 sampled a round: round time and peak memory of the whole
    process tree, access control and the audit log on, beside Flower's own simulation."""
    entries = []
    for clients in [int(c) for c in args.clients.split(",")]:
        cfg = (f"dataset=synthetic-users model=logreg num-clients={clients} fraction-train={args.sampled / clients} "
               f"num-rounds={args.rounds} privacy=plain")
        print(f"[users-scale] fedlearn, {clients} clients, {args.sampled} a round ...", flush=True)
        run = simulate_once(cfg)
        seconds = [m["seconds"] for m in run["metrics"] if m["round"] > 0]
        audited = sum(1 for line in run["audit"].splitlines() if '"update_accepted"' in line)
        entries.append(record("users-scale", _figures("fedlearn (access control, audit)", clients, args.sampled, seconds,
                                                      run["peak_rss_mib"], run["summary"]["final_accuracy"], audited), run))
    if args.stock_flower:
        clients = args.stock_flower
        print(f"[users-scale] stock Flower, {clients} clients, {args.sampled} a round ...", flush=True)
        run = stock_flower_once(clients, args.sampled, args.rounds)
        entries.append(record("users-scale", _figures("stock Flower (FedAvg, nothing else)", clients, args.sampled,
                                                      run["round_seconds"], run["peak_rss_mib"], run["final_accuracy"], 0),
                              run))
    return entries


def _figures(runtime: str, clients: int, sampled: int, seconds: list[float], peak_mib: float, accuracy: float,
             audited: int) -> dict:
    figures = {"runtime": runtime, "clients": clients, "sampled_per_round": sampled, "rounds": len(seconds),
               "first_round_seconds": seconds[0], "steady_round_seconds": _steady(seconds),
               "peak_rss_mib": peak_mib, "final_accuracy": round(accuracy, 4), "updates_audited": audited}
    print(f"    {json.dumps(figures)}", flush=True)
    return figures
