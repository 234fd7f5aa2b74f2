"""Benchmark harness: run a named scenario, append one JSON record per result to
``simulations/results/<scenario>.jsonl``.

    python -m simulations.bench fedavg-scale --clients 10,100,1000
    python -m simulations.bench mcmahan --model 2nn --partition iid -E 1 -B 10 --lrs 0.05,0.1,0.2
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
    python -m simulations.bench report                       # markdown tables of the records
    python -m simulations.bench report --docs docs/generated # one file per scenario, for the docs

Each measurement runs `fedlearn simulate` in a fresh subprocess (so Ray starts clean and
memory is attributable), while this process samples the resident memory of the whole
process tree (driver, Ray's GCS/raylet and every worker). Records carry the machine, the
software versions and the resolved config, so figures can be compared honestly.
"""

from __future__ import annotations

import argparse

from simulations.argtypes import out_directory
from simulations.bench import harness
from simulations.bench.harness import SCENARIOS, report, write_docs

# Importing a topic module registers its scenarios; this order is the order of --help and report.
from simulations.bench import scale, mcmahan, collaborative, privacy, access, deployment, training  # noqa: E402, F401, I001


def build_parser(prog: str = "python -m simulations.bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name, (function, add_args) in SCENARIOS.items():
        add_args(sub.add_parser(name, help=(function.__doc__ or "").replace("%", "%%")))  # argparse %-formats help
    show = sub.add_parser("report", help="print recorded results as markdown tables")
    # checked in main, not with choices: Python 3.11's argparse tests an empty "*" against choices as one value
    show.add_argument("names", nargs="*", metavar="SCENARIO", help=f"scenarios (default: all): {', '.join(SCENARIOS)}")
    show.add_argument("--commit", help="the commit whose records to show (default: the latest)")
    show.add_argument("--docs", type=out_directory, metavar="DIR",
                      help="instead of printing, write each scenario's tables to DIR/bench-<scenario>.md")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m simulations.bench") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.scenario == "report":
        unknown = [n for n in args.names if n not in SCENARIOS]
        if unknown:
            parser.error(f"unknown scenario {', '.join(map(repr, unknown))}: choose from {', '.join(SCENARIOS)}")
        args.names = args.names or list(SCENARIOS)
    if args.scenario == "report" and args.docs:
        written, skipped = write_docs(args.docs, args.names, args.commit)
        for path in written:
            print(f"wrote {path}")
        if skipped:
            print(f"skipped (no results recorded): {', '.join(skipped)}")
        return 0
    if args.scenario == "report":
        print("\n\n".join(report(name, args.commit) for name in args.names))
        return 0
    entries = SCENARIOS[args.scenario][0](args)
    print(f"appended {len(entries)} record(s) to {harness.RESULTS_DIR / (args.scenario + '.jsonl')}")
    return 0
