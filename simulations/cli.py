"""The `fedlearn` command. It composes every layer, so it lives in `simulations`; subcommands
import what they need lazily, so `--help` stays fast."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

from crypto.certs import CertificateError
from crypto.he import HEKeyError
from crypto.signing import KeyFileError
from fedlearn.config import RunConfig, load_toml, parse_overrides, resolve
from fedlearn.errors import ConfigError, FedlearnError
from simulations import access_cli, deploy_cli, he_cli

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_preset(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if path.suffix == ".toml":
        return load_toml(path)
    candidate = PRESETS_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise ConfigError([f"unknown preset {name_or_path!r}; available: {', '.join(preset_names())} (or a path to a .toml file)"])
    return load_toml(candidate)


def config_from_args(preset: str | None, run_config: str | None, out: str | None) -> RunConfig:
    overrides = parse_overrides(run_config or "")
    if out:
        overrides["out-dir"] = out
    return resolve(load_preset(preset) if preset else None, overrides)


def _cmd_simulate(args: argparse.Namespace) -> int:
    if args.list_keys:
        import shutil

        from fedlearn.config import reference_text

        print(reference_text(shutil.get_terminal_size((100, 24)).columns), end="")
        return 0
    config = config_from_args(args.preset, args.run_config, args.out)
    from simulations import simulate

    # Leave at once on Ctrl-C. Raised as KeyboardInterrupt inside Flower's simulation runtime,
    # it would first run Flower's clean-up, which joins worker threads and stops Ray actors
    # that may still be busy: that can take minutes.
    signal.signal(signal.SIGINT, lambda signum, frame: _interrupted())
    summary = simulate.run(config, verbose=args.verbose)
    print_next_steps(summary["run_dir"])
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from fedlearn.paths import expand
    from server.resume import load_checkpoint

    run_dir = expand(args.run_dir, "the run directory").resolve()
    config, checkpoint = load_checkpoint(run_dir)  # refuses here, before anything starts
    print(f"resuming {run_dir.name} after round {checkpoint.round} of {config.num_rounds}", file=sys.stderr)
    from simulations import simulate

    signal.signal(signal.SIGINT, lambda signum, frame: _interrupted())
    summary = simulate.run(config.replace(resume_from=str(run_dir)), verbose=args.verbose)
    print_next_steps(summary["run_dir"])
    return 0


def print_next_steps(run_dir: str | Path) -> None:
    """What a finished run left and what to do with it; the last line names the run directory
    (scripts read it: everything after the label is the path)."""
    run = Path(run_dir)
    if run.is_relative_to(Path.cwd()):
        run = run.relative_to(Path.cwd())  # runs/<id>, as the user's own --out reads
    print(f"plot      {run / 'accuracy.png'}")
    print(f"verify    fedlearn audit verify {run} --key {run / 'audit.pub'} --model {run / 'model.safetensors'}")
    print(f"inspect   fedlearn audit show {run}   (per-round table; metrics.json and summary.json hold the figures)")
    from fedlearn.runs import RUN_DIR_LABEL

    print(f"{RUN_DIR_LABEL}{run}")


def _cmd_data_download(args: argparse.Namespace) -> int:
    from fedlearn import data

    path = data.download(args.name, args.data_dir)
    print(path)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from simulations import bench

    try:
        return bench.main(args.bench_args, prog="fedlearn bench")
    except SystemExit as exc:  # its argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlearn", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Federated learning on Flower with secure aggregation or homomorphic encryption, access control "
                    "and an audit log a third party can verify.",
        epilog="exit codes: 0 done, 1 a verification failed (audit verify), 2 a usage or input error, "
               "130 interrupted,\n            70 a bug in fedlearn (please report it)\n"
               "manual: the docs/ folder of the repository (mkdocs serve)")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a federated job with simulated clients (Flower simulation)")
    sim.add_argument("--preset", help=f"a preset name ({', '.join(preset_names())}) or a .toml file")
    sim.add_argument("--run-config", help='overrides, e.g. "num-rounds=10 strategy=fedprox proximal-mu=0.01"')
    sim.add_argument("--out", help="directory for run directories (default: runs)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    sim.add_argument("--list-keys", action="store_true", help="print every config key with its default and what it does")
    sim.set_defaults(func=_cmd_simulate)

    resume = sub.add_parser("resume", help="continue a simulated run that stopped (killed, crashed) from its checkpoint")
    resume.add_argument("run_dir", type=Path, help="the run directory (runs/<run-id>)")
    resume.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    resume.set_defaults(func=_cmd_resume)

    data_cmd = sub.add_parser("data", help="dataset files")
    data_sub = data_cmd.add_subparsers(dest="data_command", required=True)
    download = data_sub.add_parser("download", help="download and verify a dataset (needs a network)")
    download.add_argument("name", choices=["mnist", "fashion-mnist", "cifar10"])
    download.add_argument("--data-dir", required=True, help="where to put it (then use data-dir=... or FEDLEARN_DATA_DIR)")
    download.set_defaults(func=_cmd_data_download)

    keys_sub = access_cli.add_commands(sub, config_from_args)
    he_cli.add_commands(sub, keys_sub)
    deploy_cli.add_commands(sub, config_from_args)

    from simulations.bench import SCENARIOS  # the standard library and psutil only

    bench = sub.add_parser("bench", help="run a benchmark scenario (same as python -m simulations.bench)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER,
                       help=f"a scenario ({', '.join(SCENARIOS)}) or report, and its options (SCENARIO --help)")
    bench.set_defaults(func=_cmd_bench)
    return parser


USER_ERRORS = (FedlearnError, KeyFileError, HEKeyError, CertificateError)
EXIT_BUG = 70  # sysexits' EX_SOFTWARE: distinct from 1 (a verification failed) and 2 (the input)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a verification failed (`audit verify`), 2 a usage or input error
    (one line that names the input and the fix), 130 interrupted, 70 a bug in fedlearn."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser, --help included (ours would answer that)
        args = argparse.Namespace(func=_cmd_bench, bench_args=argv[1:])
    else:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
            return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave: missing, unreadable, a directory, a full disk
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _interrupted()
    except Exception:
        traceback.print_exc()
        print(f"\nThis is a bug in fedlearn, not a problem with your input: please report it with the command "
              f"line ({' '.join(argv)}) and the traceback above.", file=sys.stderr)
        return EXIT_BUG


def _interrupted() -> None:
    """Stop the processes this command started (Ray's) and exit with 130, without waiting for
    Flower: its server thread may still wait on clients that are gone. Every run file is
    written atomically and audit records are whole fsynced lines (a torn last line is reported
    by `audit verify`), so what is on disk stays consistent."""
    print("interrupted; the run directory keeps the rounds finished so far (`fedlearn resume RUN_DIR` "
          "continues it)", file=sys.stderr)
    from simulations.processes import kill_children

    kill_children()  # os._exit skips Ray's own shutdown: its daemons would outlive us
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
