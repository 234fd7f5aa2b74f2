"""Privacy modes' cost: homomorphic encryption (he-ops, he-round), secure aggregation against
Flower's SecAgg+ (secagg-round), its active-adversary protections against the semi-honest
protocol (secagg-active) and threshold HE (threshold-ops, threshold-round)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from simulations.bench.harness import REPO, record, scenario


HE_SETTINGS = {"bfv-16": ("bfv", 16), "bfv-8": ("bfv", 8), "ckks": ("ckks", 16)}


def _he_ops_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", default="bfv-16,bfv-8,ckks", help=f"comma-separated: {', '.join(HE_SETTINGS)}")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="encryption processes for the parallel figure")


@scenario("he-ops", arguments=_he_ops_args)
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


def _he_round_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", default="bfv-16,bfv-8", help=f"he arms besides plain: {', '.join(HE_SETTINGS)}")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--data-dir", default=os.environ.get("FEDLEARN_DATA_DIR", str(REPO.parent / "shared" / "data")))


@scenario("he-round", arguments=_he_round_args)
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


def _secagg_round_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="mlp,cnn", help=f"comma-separated: {', '.join(SECAGG_MODELS)} (mlp: 101,770 params)")
    p.add_argument("--clients", default="10,50", help="comma-separated client counts")
    p.add_argument("--arms", default=",".join(SECAGG_ARMS), help=f"comma-separated: {', '.join(SECAGG_ARMS)}")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run; round 1 (Ray start-up) is not measured")
    p.add_argument("--data-dir", default=os.environ.get("FEDLEARN_DATA_DIR", str(REPO.parent / "shared" / "data")))


@scenario("secagg-round", arguments=_secagg_round_args)
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


def _secagg_active_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline", default="1edf0f8", help="commit whose secagg to compare against (1edf0f8: the "
                   "semi-honest protocol, the last before the active-adversary protections)")
    p.add_argument("--jobs", default="num-clients=10;num-clients=20 secagg-neighbours=6",
                   help="semicolon-separated run configs (privacy=secagg is added)")
    p.add_argument("--rounds", type=int, default=6, help="rounds per run; round 1 (Ray start-up) is not measured")
    p.add_argument("--repeats", type=int, default=2, help="alternating baseline/active pairs per job")


@scenario("secagg-active", arguments=_secagg_active_args)
def secagg_active(args: argparse.Namespace) -> list[dict]:
    """privacy=secagg with the active-adversary protections (signed advertisements, the graph
    the advertisements fix, the consistency check's extra stage) against the semi-honest
    protocol of --baseline, same job: alternating `fedlearn simulate` subprocesses of the two
    source trees, median round time of rounds 2.. and its ratio."""
    from simulations.bench.harness import simulate_once

    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                       check=True, capture_output=True)
        try:
            for job in args.jobs.split(";"):
                config = f"{job} num-rounds={args.rounds} privacy=secagg"
                seconds: dict[str, list[float]] = {"baseline": [], "active": []}
                for repeat in range(args.repeats):
                    for arm, checkout in (("baseline", baseline), ("active", REPO)):
                        print(f"[secagg-active] {job}: {arm}, run {repeat + 1}/{args.repeats} ...", flush=True)
                        run = simulate_once(config, checkout=checkout)
                        seconds[arm] += [m["seconds"] for m in run["metrics"] if m["round"] >= 2]
                medians = {arm: statistics.median(values) for arm, values in seconds.items()}
                for arm, median in medians.items():
                    figures = {"job": job, "arm": arm, "baseline_commit": args.baseline, "median_round_s": round(median, 3),
                               "ratio_vs_baseline": round(median / medians["baseline"], 3), "rounds_measured": len(seconds[arm])}
                    print(f"    {json.dumps(figures)}", flush=True)
                    entries.append(record("secagg-active", figures, {"config": config}))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], capture_output=True)
    return entries


def _threshold_ops_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--committee", type=int, default=5)
    p.add_argument("--quorum", type=int, default=3)


@scenario("threshold-ops", arguments=_threshold_ops_args)
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


def _threshold_round_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--committee", type=int, default=5)
    p.add_argument("--quorum", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4, help="rounds per run; round 1 (Ray start-up) is not measured")
    p.add_argument("--data-dir", default=os.environ.get("FEDLEARN_DATA_DIR", str(REPO.parent / "shared" / "data")))


@scenario("threshold-round", arguments=_threshold_round_args)
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
