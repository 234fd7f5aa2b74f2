"""Scale and reproduction: plain FedAvg as the number of clients grows, and McMahan et al.'s
MNIST 2NN (rounds to 97%)."""

from __future__ import annotations

import argparse
import json

from simulations.bench.harness import record, scenario, simulate_once


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


def _mcmahan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--lrs", default="0.05,0.1,0.2", help="learning rates to try (the paper tuned lr on a grid)")
    p.add_argument("--max-rounds", type=int, default=500)


@scenario("mcmahan-2nn", arguments=_mcmahan_args)
def mcmahan_2nn(args: argparse.Namespace) -> list[dict]:
    """McMahan et al. 2017, MNIST 2NN, IID, 100 clients, C=0.1, E=1, B=10: rounds to 97%."""
    entries = []
    grid = [(float(lr), int(seed)) for lr in args.lrs.split(",") for seed in args.seeds.split(",")]
    for lr, seed in grid:
        cfg = (
            f"dataset=mnist model=mnist-2nn partitioner=iid num-clients=100 fraction-train=0.1 "
            f"local-epochs=1 batch-size=10 optimizer=sgd lr={lr} num-rounds={args.max_rounds} "
            f"target-accuracy=0.97 seed={seed} privacy=plain"
        )
        print(f"[mcmahan-2nn] lr {lr}, seed {seed} ...", flush=True)
        run = simulate_once(cfg)
        reached = [m["round"] for m in run["metrics"] if m["round"] > 0 and m["accuracy"] >= 0.97]
        figures = {
            "seed": seed,
            "lr": lr,
            "rounds_to_97": reached[0] if reached else None,
            "max_rounds": args.max_rounds,
            "final_accuracy": run["summary"]["final_accuracy"],
            "paper_rounds_to_97": 87,  # McMahan et al. 2017, Table 1: 2NN, E=1, B=10, C=0.1, IID
            "total_seconds": run["summary"]["total_seconds"],
            "wall_seconds": run["wall_seconds"],
            "peak_rss_mib": run["peak_rss_mib"],
        }
        print(f"    {json.dumps(figures)}", flush=True)
        entries.append(record("mcmahan-2nn", figures, run))
    return entries
