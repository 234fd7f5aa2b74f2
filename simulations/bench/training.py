"""Local training throughput: fedlearn's client loop against a bare torch loop (and on CUDA, AMP
and clients sharing one GPU)."""

from __future__ import annotations

import argparse
import json

from simulations.bench.harness import record, scenario, simulate_once


def _throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="vision-cnn,mnist-cnn")
    p.add_argument("--examples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


@scenario("throughput", arguments=_throughput_args)
def training_throughput(args: argparse.Namespace) -> list[dict]:
    """Local training samples/s, fedlearn's client loop vs a bare torch loop on the same device
    and batch size (and on CUDA, AMP vs fp32), side by side; on CUDA also a 10-client simulation
    whose clients share the one GPU (client-resources-num-gpus=0.1)."""
    import torch

    from simulations import throughput

    entries = []
    for name in args.models.split(","):
        print(f"[throughput] {name}, {args.examples} examples x {args.epochs} epochs, batch {args.batch_size} ...", flush=True)
        figures = throughput.measure(name, examples=args.examples, batch_size=args.batch_size, epochs=args.epochs,
                                     repeats=args.repeats, device=args.device)
        print(f"    {json.dumps(figures)}", flush=True)
        entries.append(record("throughput", figures, {"config": f"model={name} batch-size={args.batch_size} device={args.device}"}))
    if torch.cuda.is_available() and args.device != "cpu":
        shared = ("model=vision-cnn dataset=synthetic32 num-clients=10 num-rounds=5 privacy=plain device=cuda "
                  "client-resources-num-gpus=0.1 client-resources-num-cpus=1")
        print("[throughput] 10 simulated clients sharing one GPU ...", flush=True)
        run = simulate_once(shared)
        figures = {"scenario": "10 clients share one GPU", "gpu": torch.cuda.get_device_name(0),
                   "final_accuracy": run["summary"]["final_accuracy"], "wall_seconds": run["wall_seconds"],
                   "round_seconds": [m["seconds"] for m in run["metrics"]]}
        print(f"    {json.dumps(figures)}", flush=True)
        entries.append(record("throughput-gpu-share", figures, run))
    else:
        print("[throughput] no CUDA GPU here: the AMP and shared-GPU measurements need one", flush=True)
    return entries
