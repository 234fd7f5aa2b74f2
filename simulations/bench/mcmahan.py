"""McMahan et al. 2017, Table 2 (MNIST): communication rounds until the global model first
reaches a target test accuracy (97% for the 2NN, 99% for the CNN), for FedSGD (E=1, B=inf) and
FedAvg with the paper's local epochs E and batch sizes B, on IID and pathological non-IID data;
plus FedAvgM and FedAdam on the non-IID rows. One command runs one row over a grid of learning
rates (the paper tuned the rate per row); the report sets the best rate's rounds beside the
paper's and draws the accuracy curves.

    python -m simulations.bench mcmahan --model 2nn --partition iid -E 1 -B 10 --lrs 0.05,0.1,0.2
    python -m simulations.bench mcmahan --model cnn --partition shards -E 5 -B 10 --strategy fedavgm
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from fedlearn.config import MODEL_INITS
from fedlearn.data import INPUT_SCALINGS
from simulations.bench.harness import record, scenario, simulate_once

# Rounds to target, (IID, pathological non-IID), keyed by (model, E, B); B None is B = infinity
# (each client's whole data as one batch). The CNN rows are Table 2 of the AISTATS 2017 version;
# the 2NN rows its appendix Table 4 (Table 2 of the first arXiv version). Table 1 measured the
# 2NN's E=1, B=10, C=0.1 setting again: 87 and 664 rounds.
PAPER: dict[tuple[str, int, int | None], tuple[int, int]] = {
    ("2nn", 1, None): (1468, 1817),  # FedSGD
    ("2nn", 10, None): (156, 1100),
    ("2nn", 1, 50): (144, 1183),
    ("2nn", 20, None): (92, 957),
    ("2nn", 1, 10): (92, 831),
    ("2nn", 10, 50): (45, 881),
    ("2nn", 20, 50): (39, 835),
    ("2nn", 10, 10): (34, 497),
    ("2nn", 20, 10): (32, 738),
    ("cnn", 1, None): (626, 483),  # FedSGD
    ("cnn", 5, None): (179, 1000),
    ("cnn", 1, 50): (65, 600),
    ("cnn", 20, None): (234, 672),
    ("cnn", 1, 10): (34, 350),
    ("cnn", 5, 50): (29, 334),
    ("cnn", 20, 50): (32, 426),
    ("cnn", 5, 10): (20, 229),
    ("cnn", 20, 10): (18, 173),
}
TARGET = {"2nn": 0.97, "cnn": 0.99}
MODEL = {"2nn": "mnist-2nn", "cnn": "mnist-cnn"}
PARTITIONS = ("iid", "shards")  # shards: sorted by label, 200 shards of 300, two per client
STRATEGIES = ("fedavg", "fedavgm", "fedadam")
CLIENTS, EXAMPLES_PER_CLIENT, FRACTION = 100, 600, 0.1
SLACK = 1.2  # "within 20%" of the paper's rounds


def _batch(text: str) -> int | None:
    if text.lower() in ("inf", "infinity", "full"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"B={text}: give a batch size >= 1, or inf for the whole client's data")
    return value


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=sorted(MODEL), required=True)
    p.add_argument("--partition", choices=PARTITIONS, default="iid",
                   help="iid, or shards (the paper's pathological non-IID: two labels per client)")
    p.add_argument("-E", "--epochs", type=int, required=True, help="local epochs E")
    p.add_argument("-B", "--batch", type=_batch, required=True, metavar="B", help="local batch size B, or inf (FedSGD: -E 1 -B inf)")
    p.add_argument("--strategy", choices=STRATEGIES, default="fedavg",
                   help="fedavgm and fedadam: server optimisers on the same client training (Hsu et al. 2019, Reddi et al. 2021)")
    p.add_argument("--server-lr", type=float, default=None,
                   help="server learning rate of fedavgm / fedadam (default: 1.0 for fedavgm, 0.01 for fedadam)")
    p.add_argument("--lrs", default="0.05,0.1,0.2", help="client learning rates to try (the paper tuned it per row)")
    p.add_argument("--seeds", default="42")
    p.add_argument("--input-scaling", choices=INPUT_SCALINGS, default="standard",
                   help="standard: pixels to mean 0 / std 1; unit: [0, 1] only")
    p.add_argument("--init", choices=MODEL_INITS, default="pytorch",
                   help="initial weights (model-init): the PyTorch layers' defaults, or a TensorFlow-era scheme")
    p.add_argument("--max-rounds", type=int, default=0,
                   help=f"stop a run that has not reached the target by then (0: {SLACK} x the paper's rounds)")


def paper_rounds(model: str, epochs: int, batch: int | None, partition: str) -> int | None:
    pair = PAPER.get((model, epochs, batch))
    return None if pair is None else pair[PARTITIONS.index(partition)]


def _paper_rounds_of(key: tuple) -> int | None:
    """The paper's figure for a report row (ROW_KEYS), from PAPER rather than from the records,
    so that a corrected transcription reaches runs already recorded."""
    model, partition, _, epochs, batch, *_ = key
    return paper_rounds(model, epochs, None if batch == "inf" else batch, partition)


def updates_per_round(epochs: int, batch: int | None) -> int:
    """The paper's u = E n / B: local steps per round (n = 600 examples per client)."""
    return epochs if batch is None else epochs * EXAMPLES_PER_CLIENT // batch


def run_config(args: argparse.Namespace, lr: float, seed: int, max_rounds: int) -> str:
    cfg = (f"dataset=mnist model={MODEL[args.model]} partitioner={args.partition} shards-per-client=2 "
           f"num-clients={CLIENTS} fraction-train={FRACTION} local-epochs={args.epochs} "
           f"batch-size={args.batch or EXAMPLES_PER_CLIENT} optimizer=sgd lr={lr} num-rounds={max_rounds} "
           f"target-accuracy={TARGET[args.model]} seed={seed} privacy=plain strategy={args.strategy} "
           f"input-scaling={args.input_scaling} model-init={args.init}")
    if args.strategy != "fedavg":
        cfg += f" server-lr={args.server_lr or (1.0 if args.strategy == 'fedavgm' else 0.01)}"
    return cfg


@scenario("mcmahan", arguments=_arguments, reporter=lambda entries, plots: report(entries, plots))
def mcmahan(args: argparse.Namespace) -> list[dict]:
    """McMahan et al. 2017, Table 2 (MNIST 2NN to 97%, CNN to 99%): one row, rounds to target
    for each learning rate and seed, beside the paper's."""
    paper = paper_rounds(args.model, args.epochs, args.batch, args.partition)
    if args.max_rounds < 0 or (not args.max_rounds and paper is None):
        raise SystemExit(f"E={args.epochs} B={args.batch or 'inf'} is not a row of the paper's table: give --max-rounds")
    max_rounds = args.max_rounds or math.ceil(SLACK * paper)
    entries = []
    for lr in [float(v) for v in args.lrs.split(",")]:
        for seed in [int(v) for v in args.seeds.split(",")]:
            cfg = run_config(args, lr, seed, max_rounds)
            print(f"[mcmahan] {args.model} {args.partition} E={args.epochs} B={args.batch or 'inf'} "
                  f"{args.strategy} lr {lr} seed {seed}, up to {max_rounds} rounds ...", flush=True)
            run = simulate_once(cfg, timeout=6 * 3600)
            curve = [round(m["accuracy"], 4) for m in run["metrics"] if m["round"] > 0]
            seconds = [m["seconds"] for m in run["metrics"] if m["round"] > 0]
            reached = next((r for r, a in enumerate(curve, 1) if a >= TARGET[args.model]), None)
            figures = {
                "model": args.model, "partition": args.partition, "strategy": args.strategy,
                "E": args.epochs, "B": args.batch or "inf", "u": updates_per_round(args.epochs, args.batch),
                "lr": lr, "server_lr": None if args.strategy == "fedavg" else float(cfg.rsplit("server-lr=", 1)[1]),
                "input_scaling": args.input_scaling, "init": args.init, "seed": seed, "target": TARGET[args.model],
                "rounds_to_target": reached, "paper_rounds": paper, "max_rounds": max_rounds,
                "best_accuracy": max(curve), "seconds_per_round": round(statistics.fmean(seconds[1:] or seconds), 3),
                "wall_seconds": run["wall_seconds"],
            }
            print(f"    {json.dumps(figures)}", flush=True)
            entries.append(record("mcmahan", figures, run, series={"accuracy": curve}))
    return entries


# ---------------------------------------------------------------------------------------
# The report: ours beside the paper, one line per row, and the curves.

# A row: one setting of everything but the client learning rate, which the report tunes.
ROW_KEYS = ("model", "partition", "strategy", "E", "B", "input_scaling", "init", "server_lr")
DEFAULTS = {"init": "pytorch"}  # for records made before the key existed


def _row_key(figures: dict) -> tuple:
    return tuple(figures.get(k, DEFAULTS.get(k)) for k in ROW_KEYS)


def _rows(entries: list[dict]) -> dict[tuple, list[dict]]:
    """Records grouped by table row. A row's grid grows one command at a time, so rates measured
    at different commits stay together; a rate and seed measured again keeps only its latest run."""
    latest: dict[tuple, dict] = {}
    for entry in entries:
        f = entry["figures"]
        latest[_row_key(f) + (f["lr"], f["seed"])] = entry
    rows: dict[tuple, list[dict]] = {}
    for key, entry in latest.items():
        rows.setdefault(key[: len(ROW_KEYS)], []).append(entry)
    return rows


def best_rate(runs: list[dict]) -> tuple[float, int | None, list[dict]]:
    """The learning rate with the fewest rounds to target (median over its seeds; a run that
    never got there counts as never; then the best accuracy reached), as the paper picked the
    best rate per row."""
    by_lr: dict[float, list[dict]] = {}
    for entry in runs:
        by_lr.setdefault(entry["figures"]["lr"], []).append(entry)

    def rounds(group: list[dict]) -> float:
        values = [e["figures"]["rounds_to_target"] or math.inf for e in group]
        return statistics.median(values)

    lr = min(by_lr, key=lambda v: (rounds(by_lr[v]), -max(e["figures"]["best_accuracy"] for e in by_lr[v]), v))
    best = rounds(by_lr[lr])
    return lr, None if best == math.inf else int(best), by_lr[lr]


def verdict(ours: int | None, paper: int | None, max_rounds: int) -> str:
    if paper is None:
        return "no paper figure"
    if ours is None:
        return f"not reached in {max_rounds} rounds"
    ratio = ours / paper
    if abs(ratio - 1) <= SLACK - 1:
        return "within 20%"
    if ratio < 1:
        return f"{1 / ratio:.1f}x fewer rounds" if ratio <= 0.5 else f"{(1 - ratio) * 100:.0f}% fewer rounds"
    return f"{ratio:.1f}x more rounds" if ratio >= 2 else f"{(ratio - 1) * 100:.0f}% more rounds"


def report(entries: list[dict], plots: Path | None = None) -> str:
    """The markdown table of every measured row; with ``plots``, also the accuracy plots
    (_plot_groups) in that directory."""
    rows = _rows(entries)
    lines = ["McMahan et al. 2017, Table 2: rounds to target accuracy, ours beside the paper's", "",
             ("| model | data | strategy | E | B | u | inputs, init | paper | ours | best lr | lrs tried | seeds | "
              "s/round after the first | verdict | commit |"), "|" + "---|" * 15]
    for key, runs in sorted(rows.items(), key=lambda kv: _order(kv[0])):
        f = runs[0]["figures"]
        paper = _paper_rounds_of(key)
        lr, ours, chosen = best_rate(runs)
        tried = sorted({e["figures"]["lr"] for e in runs})
        seconds = statistics.fmean(e["figures"]["seconds_per_round"] for e in chosen)
        max_rounds = max(e["figures"]["max_rounds"] for e in chosen)
        strategy = f["strategy"] + (f" (server lr {f['server_lr']})" if f.get("server_lr") else "")
        lines.append(f"| {f['model']} | {'IID' if f['partition'] == 'iid' else 'non-IID'} | {strategy} | {f['E']} | "
                     f"{f['B']} | {f['u']} | {key[5]}, {key[6]} | {paper} | "
                     f"{ours if ours is not None else '> ' + str(max_rounds)} | {lr} | {', '.join(map(str, tried))} | "
                     f"{len(chosen)} | {seconds:.2f} | {verdict(ours, paper, max_rounds)} | "
                     f"{', '.join(dict.fromkeys(e['machine']['commit'] for e in runs))} |")
    machine = entries[-1]["machine"]
    lines += ["", (f"Measured on {machine['cpus']} CPUs, torch {machine['torch']}, flwr {machine['flwr']}. "
                   "ours: rounds until the global model first reached the target on MNIST's 10,000 test images, "
                   "with the best learning rate tried (median over seeds). u = E x 600 / B local steps per round.")]
    if plots is not None:
        plot_curves(rows, plots)
    return "\n".join(lines)


def _is_ablation(key: tuple) -> bool:
    """A row that changes what the paper leaves unstated (pixel scaling, initial weights)."""
    return key[5:7] != ("standard", "pytorch")


def _plot_groups(rows: dict[tuple, list[dict]]) -> dict[str, list[tuple]]:
    """The rows each PNG draws: one per model and partition, the ablation rows in one of their own."""
    groups: dict[str, list[tuple]] = {}
    for key in sorted(rows, key=_order):
        name = f"mcmahan-{key[0]}-{key[1]}" + ("-ablations" if _is_ablation(key) else "") + ".png"
        groups.setdefault(name, []).append(key)
    return dict(sorted(groups.items()))


def _order(key: tuple) -> tuple:
    model, partition, strategy, epochs, batch, scaling, init, server_lr = key
    u = epochs if batch == "inf" else epochs * EXAMPLES_PER_CLIENT // batch
    return model, partition, STRATEGIES.index(strategy), _is_ablation(key), u, epochs, scaling, init, server_lr or 0


def plot_curves(rows: dict[tuple, list[dict]], directory: Path) -> None:
    """One PNG per group (_plot_groups): the best-so-far test accuracy of each row's best rate
    (the paper's Figure 2 draws the same), the target as a line, and an x where the paper reached
    it on that row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, keys in _plot_groups(rows).items():
        model, partition = keys[0][:2]
        figure, axes = plt.subplots(figsize=(10, 4.8))
        colours = plt.get_cmap("tab20").colors
        for index, key in enumerate(keys):
            lr, _, chosen = best_rate(rows[key])
            curve = chosen[0].get("series", {}).get("accuracy", [])
            best = [max(curve[: i + 1]) for i in range(len(curve))]
            variant = [f"{key[5]} inputs"] * (key[5] != "standard") + [f"{key[6]} init"] * (key[6] != "pytorch")
            variant += [f"server lr {key[7]}"] * (key[7] is not None)
            label = f"{key[2]} E={key[3]} B={key[4]}" + (f" ({', '.join(variant)})" if variant else "") + f", lr {lr}"
            (line,) = axes.plot(range(1, len(best) + 1), best, label=label, color=colours[index % len(colours)],
                                linestyle=("-", "--")[index // len(colours) % 2])
            if paper := _paper_rounds_of(key):  # where the paper reached the target on this row
                axes.plot(paper, TARGET[model], marker="x", color=line.get_color())
        axes.axhline(TARGET[model], color="gray", linewidth=0.8)
        title = f"MNIST {model.upper()}, {'IID' if partition == 'iid' else 'pathological non-IID'}, C=0.1"
        axes.set(xlabel="communication rounds", ylabel="test accuracy (best so far)", xscale="log",
                 ylim=(TARGET[model] - 0.07, 1.0), title=title + (", ablations" if "ablations" in name else ""))
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        figure.tight_layout()
        figure.savefig(directory / name, dpi=110)
        plt.close(figure)
