"""Benchmark harness: run a named scenario, append one JSON record per result to
``simulations/results/<scenario>.jsonl``.

    python -m simulations.bench fedavg-scale --clients 10,100,1000
    python -m simulations.bench mcmahan-2nn --seeds 42,43,44
    python -m simulations.bench access-overhead
    python -m simulations.bench secagg-round --models mlp,cnn --clients 10,50
    python -m simulations.bench ifca-rotated-digits --seeds 42,43,44
    python -m simulations.bench personalisation --dataset mnist --rounds 10
    python -m simulations.bench fedmd
    python -m simulations.bench multimodel
    python -m simulations.bench fedbuff
    python -m simulations.bench throughput
    python -m simulations.bench threshold-ops
    python -m simulations.bench threshold-round

Each measurement runs `fedlearn simulate` in a fresh subprocess (so Ray starts clean and
memory is attributable), while this process samples the resident memory of the whole
process tree (driver, Ray's GCS/raylet and every worker). Records carry the machine, the
software versions and the resolved config, so figures can be compared honestly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import flwr
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": commit,
    }


class TreeMemory:
    """Peak total RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def simulate_once(run_config: str, timeout: float = 3600, preset: str | None = None) -> dict:
    """Run `fedlearn simulate` in a subprocess; return its summary, metrics and peak RSS (and
    the cluster membership when the strategy writes one)."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "simulations.cli", "simulate", "--run-config", run_config, "--out", out]
        command += ["--preset", preset] if preset else []
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            with TreeMemory(proc.pid) as memory:
                stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:  # timed out or interrupted: stop it and its Ray processes
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"simulate failed ({proc.returncode}) for {run_config!r}:\n{stderr[-3000:]}")
        run_dir = Path(stdout.strip().splitlines()[-1])
        clusters = run_dir / "clusters.json"
        return {
            "clusters": json.loads(clusters.read_text()) if clusters.is_file() else None,
            "summary": json.loads((run_dir / "summary.json").read_text()),
            "metrics": json.loads((run_dir / "metrics.json").read_text()),
            "config": (run_dir / "config.toml").read_text(),
            "peak_rss_mib": round(memory.peak / 2**20, 1),
            "wall_seconds": round(wall, 2),
        }


def record(scenario: str, figures: dict, run: dict) -> dict:
    entry = {
        "scenario": scenario,
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "figures": figures,
        "config": run["config"],
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(RESULTS_DIR / f"{scenario}.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    return entry


# ---------------------------------------------------------------------------------------
# Scenarios


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


def ifca_rotated_digits(args: argparse.Namespace) -> list[dict]:
    """IFCA vs one FedAvg model on rotated digits (presets ifca-/fedavg-rotated-digits, which
    differ only in the strategy), seed by seed in one run: accuracy on each client's own rotation
    and how well IFCA's clusters recover the true rotation groups."""
    entries = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs = {}
        for strategy in ("fedavg", "ifca"):
            print(f"[ifca-rotated-digits] {strategy}, seed {seed} ...", flush=True)
            runs[strategy] = simulate_once(f"seed={seed} num-rounds={args.rounds}", preset=f"{strategy}-rotated-digits")
        agreement = runs["ifca"]["clusters"]["agreement"]
        recovered = [int(r) for r, v in agreement.items() if v == 1.0]
        figures = {
            "seed": seed,
            "rounds": args.rounds,
            "fedavg_accuracy": runs["fedavg"]["summary"]["final_accuracy"],
            "ifca_accuracy": runs["ifca"]["summary"]["final_accuracy"],
            "gain_points": round(100 * (runs["ifca"]["summary"]["final_accuracy"] - runs["fedavg"]["summary"]["final_accuracy"]), 2),
            "final_cluster_agreement": agreement[str(max(int(r) for r in agreement))],
            "first_round_recovered": min(recovered) if recovered else None,
            "paper_ifca_vs_global": "94.2 vs 86.7 (rotated MNIST)",
            "fedavg_seconds": runs["fedavg"]["summary"]["total_seconds"],
            "ifca_seconds": runs["ifca"]["summary"]["total_seconds"],
        }
        print(f"    {json.dumps(figures)}", flush=True)
        entries.append(record("ifca-rotated-digits", figures, runs["ifca"]))
    return entries


def client_accuracies(run: dict) -> dict[str, float]:
    """Each client's test accuracy in a run's last round (clients evaluate their own models)."""
    return run["metrics"][-1]["client_accuracy"]


def per_client_comparison(ours: dict[str, float], baseline: dict[str, float]) -> dict:
    gains = [ours[c] - baseline[c] for c in baseline]
    return {
        "clients_better": sum(g > 0 for g in gains),
        "clients": len(gains),
        "worst_gain_points": round(100 * min(gains), 2),
        "mean_gain_points": round(100 * statistics.mean(gains), 2),
    }


def personalisation(args: argparse.Namespace) -> list[dict]:
    """FedPer vs FedAvg under Dirichlet(0.1) label skew (presets fedper-/fedavg-dirichlet-digits,
    which differ only in the strategy; --dataset mnist runs them on MNIST), seed by seed in one
    run: each client's accuracy on its own held-out data, under the presets' privacy mode (secagg).
    ``pooled``: all clients' local test examples together; ``mean``: the mean of the clients'."""
    entries = []
    data = f"dataset='{args.dataset}' data-dir='{args.data_dir}' mlp-hidden=128" if args.dataset == "mnist" else ""
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs = {}
        for strategy in ("fedavg", "fedper"):
            print(f"[personalisation] {strategy} on {args.dataset}, seed {seed} ...", flush=True)
            runs[strategy] = simulate_once(f"seed={seed} num-rounds={args.rounds} {data}", preset=f"{strategy}-dirichlet-digits")
        fedavg, fedper = client_accuracies(runs["fedavg"]), client_accuracies(runs["fedper"])
        figures = {
            "dataset": args.dataset,
            "seed": seed,
            "rounds": args.rounds,
            "fedavg_pooled_accuracy": round(runs["fedavg"]["summary"]["final_accuracy"], 4),
            "fedper_pooled_accuracy": round(runs["fedper"]["summary"]["final_accuracy"], 4),
            "fedavg_mean_client_accuracy": round(statistics.mean(fedavg.values()), 4),
            "fedper_mean_client_accuracy": round(statistics.mean(fedper.values()), 4),
            **per_client_comparison(fedper, fedavg),
            "fedavg_bytes_up": runs["fedavg"]["summary"]["bytes_up"],
            "fedper_bytes_up": runs["fedper"]["summary"]["bytes_up"],
        }
        print(f"    {json.dumps(figures)}", flush=True)
        entries.append(record("personalisation", figures, runs["fedper"]))
    return entries


def fedmd(args: argparse.Namespace) -> list[dict]:
    """FedMD with three architectures (preset fedmd-digits, secagg) vs each client's local-only
    training (distill-epochs=0: the same models, seeds and data, nothing shared), the same
    FedMD job under plain and he, and with the consensus distilled as averaged
    (consensus-temperature=1, FedMD's original), seed by seed in one run."""
    entries = []
    arms = {
        "local": "distill-epochs=0",
        "fedmd_secagg": "",
        "fedmd_plain": "privacy=plain",
        "fedmd_he": "privacy=he",
        "fedmd_averaged": "consensus-temperature=1",
    }
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs = {}
        for arm, overrides in arms.items():
            print(f"[fedmd] {arm}, seed {seed} ...", flush=True)
            runs[arm] = simulate_once(f"seed={seed} {overrides}", preset="fedmd-digits")
        local = client_accuracies(runs["local"])
        figures = {
            "seed": seed,
            "local_mean_accuracy": round(statistics.mean(local.values()), 4),
            **{f"{arm}_mean_accuracy": round(statistics.mean(client_accuracies(runs[arm]).values()), 4) for arm in arms if arm != "local"},
            **per_client_comparison(client_accuracies(runs["fedmd_secagg"]), local),
            "averaged_clients_better": per_client_comparison(client_accuracies(runs["fedmd_averaged"]), local)["clients_better"],
            "upload_bytes_per_round_secagg": runs["fedmd_secagg"]["metrics"][-1]["bytes_up"],
            "upload_bytes_per_round_he": runs["fedmd_he"]["metrics"][-1]["bytes_up"],
        }
        print(f"    {json.dumps(figures)}", flush=True)
        entries.append(record("fedmd", figures, runs["fedmd_secagg"]))
    return entries


def multimodel_vs_separate(args: argparse.Namespace) -> list[dict]:
    """One multimodel run of three architectures (preset multimodel-digits, secagg, every client
    training every model) vs one FedAvg run per architecture on the same job, in one run: each
    model's accuracy side by side, and the wall time and bytes of one run vs all three."""
    entries = []
    names = ["logreg", "mlp", "mnist-cnn"]
    for seed in [int(s) for s in args.seeds.split(",")]:
        print(f"[multimodel] multimodel, seed {seed} ...", flush=True)
        together = simulate_once(f"seed={seed}", preset="multimodel-digits")
        alone = {}
        for name in names:
            print(f"[multimodel] fedavg model={name}, seed {seed} ...", flush=True)
            alone[name] = simulate_once(f"seed={seed} strategy=fedavg models='' model={name}", preset="multimodel-digits")
        per_model = together["metrics"][-1]["model_accuracy"]
        figures = {
            "seed": seed,
            **{f"{name}_multimodel": round(per_model[name], 4) for name in names},
            **{f"{name}_alone": round(alone[name]["summary"]["final_accuracy"], 4) for name in names},
            "max_accuracy_difference": max(abs(per_model[n] - alone[n]["summary"]["final_accuracy"]) for n in names),
            "multimodel_wall_seconds": together["wall_seconds"],
            "separate_wall_seconds": round(sum(run["wall_seconds"] for run in alone.values()), 2),
            "multimodel_bytes": together["summary"]["bytes_up"] + together["summary"]["bytes_down"],
            "separate_bytes": sum(run["summary"]["bytes_up"] + run["summary"]["bytes_down"] for run in alone.values()),
        }
        print(f"    {json.dumps(figures)}", flush=True)
        entries.append(record("multimodel", figures, together))
    return entries


def fedbuff_vs_fedavg(args: argparse.Namespace) -> list[dict]:
    """FedBuff vs synchronous FedAvg with stragglers (slow-fraction of the clients take
    slow-seconds longer per update), side by side in one run: FedAvg runs its rounds, FedBuff
    runs until it reaches FedAvg's final accuracy; wall time to that accuracy in each."""
    entries = []
    common = (f"privacy=plain num-clients={args.clients} slow-fraction={args.slow_fraction} "
              f"slow-seconds={args.slow_seconds} client-resources-num-cpus={args.cpus_per_client}")
    for seed in [int(s) for s in args.seeds.split(",")]:
        print(f"[fedbuff] fedavg, seed {seed} ...", flush=True)
        fedavg = simulate_once(f"{common} seed={seed} strategy=fedavg num-rounds={args.rounds}")
        target = fedavg["summary"]["final_accuracy"]
        print(f"[fedbuff] fedbuff to accuracy {target:.4f}, seed {seed} ...", flush=True)
        fedbuff = simulate_once(f"{common} seed={seed} strategy=fedbuff num-rounds={args.max_updates} target-accuracy={target}")

        def seconds_to(run: dict, skip_first: bool) -> float | None:
            rounds = [m for m in run["metrics"] if m["round"] > (1 if skip_first else 0)]
            reached = [i for i, m in enumerate(rounds) if m["accuracy"] >= target]
            return round(sum(m["seconds"] for m in rounds[: reached[0] + 1]), 2) if reached else None

        figures = {
            "seed": seed,
            "clients": args.clients,
            "slow_fraction": args.slow_fraction,
            "slow_seconds": args.slow_seconds,
            "target_accuracy": round(target, 4),
            "fedavg_rounds": args.rounds,
            "fedbuff_server_updates": fedbuff["metrics"][-1]["round"],
            "fedbuff_reached": fedbuff["summary"]["final_accuracy"] >= target,
            "fedavg_seconds": seconds_to(fedavg, False),
            "fedbuff_seconds": seconds_to(fedbuff, False),
            "fedavg_seconds_after_round_1": seconds_to(fedavg, True),
            "fedbuff_seconds_after_update_1": seconds_to(fedbuff, True),
        }
        print(f"    {json.dumps(figures)}", flush=True)
        entries.append(record("fedbuff", figures, fedbuff))
    return entries


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


HE_SETTINGS = {"bfv-16": ("bfv", 16), "bfv-8": ("bfv", 8), "ckks": ("ckks", 16)}


def he_ops(args: argparse.Namespace) -> list[dict]:
    """Per-client encrypt, server add, client decrypt seconds and upload bytes per parameter, for a
    100k-parameter vector and the McMahan MNIST CNN (1.66M), against the plain fp32 payload."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from flwr.app import RecordDict

    from crypto.he import HEKey
    from fedlearn import he, models
    from fedlearn.config import RunConfig
    from server.grid import payload_bytes

    cnn = {k: v.numpy() for k, v in models.build("mnist-cnn", (1, 28, 28), 10, seed=0).state_dict().items()}
    shapes = {"vector-100k": {"w": np.zeros(100_000, np.float32)}, "mnist-cnn": cnn}
    rng = np.random.default_rng(0)
    entries = []
    for name, template in shapes.items():
        params = sum(a.size for a in template.values())
        clear = {k: rng.normal(0, 0.05, a.shape).astype(np.float32) for k, a in template.items()}
        plain_bytes = payload_bytes(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in clear.items()})}))
        for setting in args.settings.split(","):
            scheme, bits = HE_SETTINGS[setting]
            key = HEKey.generate(scheme, args.clients)
            factor = RunConfig.from_flat({"he-bits": bits}).he_range_factor()  # the run's default ranges
            client = he.ModelCodec(key, template, bits, factor)
            server = he.ModelCodec(key.public(), template, bits, factor)
            exponents = client.exponents_for(clear)
            locals_ = [{k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in clear.items()}
                       for _ in range(args.clients)]
            started = time.perf_counter()
            parts = [client.encrypt(he.flatten(m), 1.0, args.clients, exponents) for m in locals_]
            encrypt = (time.perf_counter() - started) / args.clients
            upload = payload_bytes(RecordDict({"arrays": he.encrypted_record(parts[0].chunks)}))
            summer = server.summer(args.clients, exponents)
            started = time.perf_counter()
            for part in parts:
                summer.check(part)  # what access control does on arrival (deserialises each ciphertext)
            check = time.perf_counter() - started
            started = time.perf_counter()
            total = summer.add(parts)
            add = time.perf_counter() - started
            started = time.perf_counter()
            model = client.decrypt(total.chunks, he.StateMeta(total.terms, total.weight, args.clients, exponents))
            decrypt = time.perf_counter() - started
            parallel = he.ModelCodec(key, template, bits, factor, workers=args.workers)
            parallel.encrypt(he.flatten(locals_[0]), 1.0, args.clients, exponents)  # start the pool
            started = time.perf_counter()
            for m in locals_[:3]:
                parallel.encrypt(he.flatten(m), 1.0, args.clients, exponents)
            encrypt_parallel = (time.perf_counter() - started) / 3
            mean = {k: np.mean([m[k] for m in locals_], axis=0) for k in clear}
            error = max(float(np.abs(model[k] - mean[k]).max()) for k in clear)
            figures = {
                "model": name, "parameters": params, "setting": setting, "clients": args.clients,
                "encrypt_s_per_client": round(encrypt, 4),
                f"encrypt_s_{args.workers}_workers": round(encrypt_parallel, 4), "server_check_s": round(check, 4),
                "server_add_s": round(add, 4), "decrypt_s": round(decrypt, 4),
                "upload_bytes_per_param": round(upload / params, 3),
                "plain_bytes_per_param": round(plain_bytes / params, 3),
                "size_vs_plain": round(upload / plain_bytes, 3),
                "max_abs_error": float(f"{error:.3g}"),
                "server_context_bytes": len(key.public().to_bytes()),
            }
            print(f"    {json.dumps(figures)}", flush=True)
            entries.append(record("he-ops", figures, {"config": f"settings={args.settings} clients={args.clients}"}))
    return entries


def he_round(args: argparse.Namespace) -> list[dict]:
    """Full rounds of the MNIST CNN job with 10 clients, he vs plain, alternating runs in this
    process: round time ratio, upload per round, accuracy."""
    import statistics

    from rich.console import Console

    from fedlearn.config import RunConfig
    from simulations import simulate

    arms = {"plain": {"privacy": "plain"}, **{s: {"privacy": "he", "he-scheme": HE_SETTINGS[s][0], "he-bits": HE_SETTINGS[s][1]}
                                               for s in args.settings.split(",")}}
    rounds: dict[str, list[dict]] = {arm: [] for arm in arms}
    accuracy: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as out:
        base = {"dataset": "mnist", "model": "mnist-cnn", "num-clients": args.clients, "local-epochs": 1,
                "batch-size": 32, "optimizer": "sgd", "lr": 0.05, "num-rounds": args.rounds,
                "evaluate-on": "clients", "out-dir": out, "data-dir": args.data_dir}
        for repeat in range(args.repeats):
            for arm, overrides in arms.items():
                config = RunConfig.from_flat({**base, **overrides})
                print(f"[he-round] run {repeat + 1}/{args.repeats}, {arm} ...", flush=True)
                with open(os.devnull, "w") as quiet:
                    summary = simulate.run(config, console=Console(file=quiet))
                metrics = json.loads((Path(summary["run_dir"]) / "metrics.json").read_text())
                rounds[arm] += [m for m in metrics if m["round"] >= 2]  # round 1 includes Ray start-up
                accuracy[arm].append(summary["final_accuracy"])
    plain = statistics.median(m["seconds"] for m in rounds["plain"])
    params = 1_663_370
    entries = []
    for arm in arms:
        median = statistics.median(m["seconds"] for m in rounds[arm])
        figures = {
            "arm": arm, "clients": args.clients, "rounds_measured": len(rounds[arm]),
            "median_round_s": round(median, 3), "round_time_ratio_vs_plain": round(median / plain, 3),
            "upload_bytes_per_param": round(statistics.median(m["bytes_up"] for m in rounds[arm]) / args.clients / params, 3),
            "final_accuracy": [round(a, 4) for a in accuracy[arm]],
        }
        print(f"    {json.dumps(figures)}", flush=True)
        entries.append(record("he-round", figures, {"config": json.dumps(base)}))
    return entries


SECAGG_MODELS = {"mlp": {"model": "mlp", "mlp-hidden": 128}, "cnn": {"model": "mnist-cnn"}}
SECAGG_ARMS = ("plain", "secagg", "secagg-k10", "flower-plain", "flower-secagg+")  # secagg-kK: K neighbours


def later_rounds(config) -> tuple[list[float], list[int], dict]:
    """Simulate ``config`` in this process, quietly: seconds and upload bytes of rounds 2.. (round
    1 includes Ray's start-up), and the run summary."""
    from rich.console import Console

    from simulations import simulate

    with open(os.devnull, "w") as quiet:
        summary = simulate.run(config, console=Console(file=quiet))
    metrics = json.loads((Path(summary["run_dir"]) / "metrics.json").read_text())
    later = [m for m in metrics if m["round"] >= 2]
    return [m["seconds"] for m in later], [m["bytes_up"] for m in later], summary


def secagg_round(args: argparse.Namespace) -> list[dict]:
    """Full rounds of an MNIST job (1 local epoch), side by side in this process: plain and
    secagg (ours, Message API) next to Flower's legacy workflow without and with its SecAgg+,
    for each model and client count: median round time (rounds 2..), ratios, upload per parameter."""
    import statistics

    from fedlearn import models
    from fedlearn.config import RunConfig
    from simulations import engine, flower_secagg

    entries = []
    with tempfile.TemporaryDirectory() as out:
        for model_name in args.models.split(","):
            for clients in (int(c) for c in args.clients.split(",")):
                base = {"dataset": "mnist", "num-clients": clients, "local-epochs": 1, "batch-size": 32,
                        "optimizer": "sgd", "lr": 0.05, "num-rounds": args.rounds, "out-dir": out,
                        "data-dir": args.data_dir, "min-available-clients": clients, **SECAGG_MODELS[model_name]}
                params = models.count_parameters(models.for_run(RunConfig.from_flat(base)))
                measured: dict[str, dict] = {}
                for arm in args.arms.split(","):
                    print(f"[secagg-round] {model_name} ({params} params), {clients} clients, {arm} ...", flush=True)
                    if arm.startswith("secagg-k") and clients <= int(arm[len("secagg-k"):]) + 1:
                        continue  # that many neighbours is the complete graph: the secagg arm
                    if arm == "plain" or arm.startswith("secagg"):
                        neighbours = int(arm[len("secagg-k"):]) if arm.startswith("secagg-k") else 0
                        config = RunConfig.from_flat({**base, "privacy": arm[:6] if neighbours else arm,
                                                      "secagg-neighbours": neighbours})
                        seconds, up, summary = later_rounds(config)
                        accuracy = summary["final_accuracy"]
                    else:
                        config = RunConfig.from_flat(base)
                        server_app, client_app, timings = flower_secagg.apps(config, secure=arm == "flower-secagg+")
                        engine.simulate(server_app, client_app, clients)
                        seconds, up = timings["rounds"][1:], timings["bytes_up"][1:]
                        accuracy = timings["accuracy"][-1]
                    measured[arm] = {"median_round_s": statistics.median(seconds),
                                     "upload_bytes_per_param": statistics.median(up) / clients / params,
                                     "final_accuracy": accuracy, "rounds_measured": len(seconds)}
                    print(f"    {json.dumps(measured[arm])}", flush=True)
                for arm, m in measured.items():
                    reference = "flower-plain" if arm.startswith("flower") and "flower-plain" in measured else "plain"
                    figures = {
                        "model": f"{model_name} ({params})", "clients": clients, "arm": arm,
                        "median_round_s": round(m["median_round_s"], 3),
                        "ratio_vs_plain": round(m["median_round_s"] / measured["plain"]["median_round_s"], 3) if "plain" in measured else None,
                        "ratio_vs_own_plain": round(m["median_round_s"] / measured[reference]["median_round_s"], 3) if reference in measured else None,
                        "upload_bytes_per_param": round(m["upload_bytes_per_param"], 3),
                        "final_accuracy": round(m["final_accuracy"], 4), "rounds_measured": m["rounds_measured"],
                    }
                    entries.append(record("secagg-round", figures, {"config": json.dumps(base)}))
    return entries


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
        run_dir = Path(proc.stdout.strip().splitlines()[-1])
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


def threshold_ops(args: argparse.Namespace) -> list[dict]:
    """Threshold BFV (crypto/threshold.py, OpenFHE) on a model-sized vector: the key ceremony's
    cryptography, per-client fixed-point encode + encrypt + serialize, the server's add of every
    client's ciphertexts, each committee member's partial decryption, fusion, recovery of the
    missing members' key shares by a quorum, bytes per parameter, and the decoded sum's error
    against numpy's float sum (with the fixed-point bound it must stay within), in this process."""
    import numpy as np

    from crypto import threshold
    from crypto.fixedpoint import FixedPoint

    rng = np.random.default_rng(0)
    members, quorum, params = args.committee, args.quorum, args.params
    context = threshold.new_context()
    started = time.perf_counter()
    shares, public = [], None
    for member in range(members):
        shares.append(threshold.make_share(context, member, public))
        public = shares[-1].public
    backups = [threshold.back_up(share, members, quorum) for share in shares]
    ceremony = time.perf_counter() - started
    encoding = FixedPoint.widest(threshold.SUM_BITS, args.clients)
    bound = 2.0 ** -3  # a tensor's clipping range (fedlearn: a power of two above its largest value)
    updates = [rng.uniform(-0.05, 0.05, params) for _ in range(args.clients)]
    print(f"[threshold-ops] {args.clients} clients x {params} parameters, committee {quorum} of {members} ...", flush=True)
    encrypted, encrypt_seconds = [], []
    for update in updates:
        started = time.perf_counter()
        encoded, _ = encoding.encode(update, 1.0, bound)
        encrypted.append(threshold.encrypt(context, public, encoded))
        encrypt_seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    total = threshold.add(context, encrypted)
    add = time.perf_counter() - started
    partials, partial_seconds = {}, []
    for share in shares:
        started = time.perf_counter()
        partials[share.member] = threshold.partial_decrypt(context, share, total)
        partial_seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    values = encoding.decode(threshold.fuse(context, partials, members, params).astype(np.uint64), args.clients, bound)
    fusion = time.perf_counter() - started
    started = time.perf_counter()
    present = list(range(quorum))
    for missing in range(quorum, members):  # the n - t others dropped out: the quorum opens their shares
        threshold.recover_share(backups[missing].sealed, missing, [backups[missing].shares[m] for m in present], quorum)
    recovery = time.perf_counter() - started
    upload = sum(len(blob) for blob in encrypted[0])
    figures = {
        "scheme": "bfv", "parameters": params, "clients": args.clients, "committee": members, "quorum": quorum,
        "ring_dimension": threshold.RING_DIMENSION, "ciphertexts_per_client": len(encrypted[0]),
        "value_bits": encoding.bits, "key_ceremony_s": round(ceremony, 3),
        "encrypt_s_per_client": round(statistics.median(encrypt_seconds), 3),
        "server_add_s": round(add, 3),
        "partial_decrypt_s_per_member": round(statistics.median(partial_seconds), 3),
        "fusion_s": round(fusion, 3),
        f"recover_{members - quorum}_shares_s": round(recovery, 4),
        "upload_bytes_per_param": round(upload / params, 2),
        "partial_bytes_per_param": round(sum(len(b) for b in partials[0]) / params, 2),
        "max_abs_error": float(f"{np.abs(values - np.sum(updates, axis=0)).max():.3g}"),
        "error_bound": float(f"{encoding.error_bound(args.clients, bound):.3g}"),
    }
    print(f"    {json.dumps(figures)}", flush=True)
    return [record("threshold-ops", figures, {"config": f"params={params} clients={args.clients} committee={members} quorum={quorum}"})]


def threshold_round(args: argparse.Namespace) -> list[dict]:
    """Full rounds of the MNIST CNN job, plain and he-threshold side by side in this process
    (same seed): median round time of rounds 2.., their ratio, upload per parameter, accuracies."""
    import statistics

    from fedlearn import models
    from fedlearn.config import RunConfig

    entries = []
    with tempfile.TemporaryDirectory() as out:
        base = {"dataset": "mnist", "model": "mnist-cnn", "num-clients": args.clients, "local-epochs": 1,
                "batch-size": 32, "optimizer": "sgd", "lr": 0.05, "num-rounds": args.rounds, "out-dir": out,
                "data-dir": args.data_dir, "min-available-clients": args.clients,
                "threshold-committee": args.committee, "threshold-quorum": args.quorum}
        params = models.count_parameters(models.for_run(RunConfig.from_flat(base)))
        measured = {}
        for arm in ("plain", "he-threshold"):
            print(f"[threshold-round] mnist-cnn ({params} params), {args.clients} clients, {arm} ...", flush=True)
            seconds, up, summary = later_rounds(RunConfig.from_flat({**base, "privacy": arm}))
            measured[arm] = {"median_round_s": statistics.median(seconds), "final_accuracy": summary["final_accuracy"],
                             "upload_bytes_per_param": statistics.median(up) / args.clients / params,
                             "rounds_measured": len(seconds)}
            print(f"    {json.dumps(measured[arm])}", flush=True)
        plain, ours = measured["plain"], measured["he-threshold"]
        figures = {
            "model": f"mnist-cnn ({params})", "clients": args.clients, "committee": args.committee, "quorum": args.quorum,
            "rounds": args.rounds, "rounds_measured": ours["rounds_measured"],
            "plain_round_s": round(plain["median_round_s"], 3), "threshold_round_s": round(ours["median_round_s"], 3),
            "ratio_vs_plain": round(ours["median_round_s"] / plain["median_round_s"], 3),
            "plain_upload_bytes_per_param": round(plain["upload_bytes_per_param"], 3),
            "threshold_upload_bytes_per_param": round(ours["upload_bytes_per_param"], 3),
            "plain_accuracy": round(plain["final_accuracy"], 4), "threshold_accuracy": round(ours["final_accuracy"], 4),
            "accuracy_difference_points": round(100 * (ours["final_accuracy"] - plain["final_accuracy"]), 2),
        }
        entries.append(record("threshold-round", figures, {"config": json.dumps(base)}))
    return entries


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


SCENARIOS: dict[str, tuple[Callable[[argparse.Namespace], list[dict]], Callable[[argparse.ArgumentParser], None]]] = {}


def _scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", default="10,100,1000", help="comma-separated client counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="logreg")


def _mcmahan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--lrs", default="0.05,0.1,0.2", help="learning rates to try (the paper tuned lr on a grid)")
    p.add_argument("--max-rounds", type=int, default=500)


def _overhead_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=20, help="rounds per run (the default job has 10)")
    p.add_argument("--repeats", type=int, default=2, help="alternating with/without pairs")


def _he_ops_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", default="bfv-16,bfv-8,ckks", help=f"comma-separated: {', '.join(HE_SETTINGS)}")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="encryption processes for the parallel figure")


def _he_round_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", default="bfv-16,bfv-8", help=f"he arms besides plain: {', '.join(HE_SETTINGS)}")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--data-dir", default=os.environ.get("FEDLEARN_DATA_DIR", str(REPO.parent / "shared" / "data")))


def _secagg_round_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="mlp,cnn", help=f"comma-separated: {', '.join(SECAGG_MODELS)} (mlp: 101,770 params)")
    p.add_argument("--clients", default="10,50", help="comma-separated client counts")
    p.add_argument("--arms", default=",".join(SECAGG_ARMS), help=f"comma-separated: {', '.join(SECAGG_ARMS)}")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run; round 1 (Ray start-up) is not measured")
    p.add_argument("--data-dir", default=os.environ.get("FEDLEARN_DATA_DIR", str(REPO.parent / "shared" / "data")))


def _seeds_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default="42,43,44")


def _personalisation_args(p: argparse.ArgumentParser) -> None:
    _seeds_args(p)
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--data-dir", default=os.environ.get("FEDLEARN_DATA_DIR", str(REPO.parent / "shared" / "data")))


def _fedbuff_args(p: argparse.ArgumentParser) -> None:
    _seeds_args(p)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10, help="fedavg's rounds; fedbuff runs to its final accuracy")
    p.add_argument("--max-updates", type=int, default=100, help="fedbuff's server updates at the most")
    p.add_argument("--slow-fraction", type=float, default=0.3)
    p.add_argument("--slow-seconds", type=float, default=2.0)
    p.add_argument("--cpus-per-client", type=float, default=0.2, help="Ray CPUs per client: 0.2 lets 10 run at once on 2 cores")


def _ifca_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--rounds", type=int, default=30)


def _deploy_latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--privacy", default="plain,secagg", help="comma-separated privacy modes")


SCENARIOS["fedavg-scale"] = (fedavg_scale, _scale_args)
SCENARIOS["deploy-latency"] = (deploy_latency, _deploy_latency_args)
SCENARIOS["he-ops"] = (he_ops, _he_ops_args)
SCENARIOS["he-round"] = (he_round, _he_round_args)
SCENARIOS["access-overhead"] = (access_overhead, _overhead_args)
SCENARIOS["secagg-round"] = (secagg_round, _secagg_round_args)
SCENARIOS["mcmahan-2nn"] = (mcmahan_2nn, _mcmahan_args)
SCENARIOS["ifca-rotated-digits"] = (ifca_rotated_digits, _ifca_args)
SCENARIOS["personalisation"] = (personalisation, _personalisation_args)
def _throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="vision-cnn,mnist-cnn")
    p.add_argument("--examples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _threshold_ops_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--committee", type=int, default=5)
    p.add_argument("--quorum", type=int, default=3)


SCENARIOS["throughput"] = (training_throughput, _throughput_args)
SCENARIOS["threshold-ops"] = (threshold_ops, _threshold_ops_args)


def _threshold_round_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--committee", type=int, default=5)
    p.add_argument("--quorum", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4, help="rounds per run; round 1 (Ray start-up) is not measured")
    p.add_argument("--data-dir", default=os.environ.get("FEDLEARN_DATA_DIR", str(REPO.parent / "shared" / "data")))


SCENARIOS["threshold-round"] = (threshold_round, _threshold_round_args)
SCENARIOS["fedmd"] = (fedmd, _seeds_args)
SCENARIOS["multimodel"] = (multimodel_vs_separate, _seeds_args)
SCENARIOS["fedbuff"] = (fedbuff_vs_fedavg, _fedbuff_args)


def report(scenario: str, commit: str | None = None) -> str:
    """A markdown table of a scenario's recorded figures (the latest commit's, by default)."""
    path = RESULTS_DIR / f"{scenario}.jsonl"
    if not path.is_file():
        return f"no results recorded for {scenario} ({path} is missing)"
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    commit = commit or entries[-1]["machine"]["commit"]
    rows = [e for e in entries if e["machine"]["commit"] == commit]
    columns = list(rows[0]["figures"])
    lines = [
        f"{scenario} (commit {commit}, {rows[0]['machine']['cpus']} CPUs, torch {rows[0]['machine']['torch']}, "
        f"flwr {rows[0]['machine']['flwr']}, {rows[0]['when'][:10]})",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(str(r["figures"][c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name, (function, add_args) in SCENARIOS.items():
        add_args(sub.add_parser(name, help=function.__doc__))
    show = sub.add_parser("report", help="print recorded results as markdown tables")
    show.add_argument("names", nargs="*", default=list(SCENARIOS), help="scenarios (default: all)")
    show.add_argument("--commit", help="the commit whose records to show (default: the latest)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.scenario == "report":
        print("\n\n".join(report(name, args.commit) for name in args.names))
        return 0
    entries = SCENARIOS[args.scenario][0](args)
    print(f"appended {len(entries)} record(s) to {RESULTS_DIR / (args.scenario + '.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
