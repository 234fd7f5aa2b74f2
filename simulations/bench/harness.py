"""The benchmark harness: machine facts, the memory of a process tree, one `fedlearn simulate`
in a subprocess, the JSONL records under ``simulations/results/``, their markdown report, and
the registry of scenarios (``@scenario``), which the topic modules of this package fill.

Imports the standard library and psutil only; a scenario imports torch, flwr and fedlearn when it
runs, so the command's --help stays fast.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "simulations" / "results"  # tests monkeypatch this attribute of this module

Scenario = Callable[[argparse.Namespace], list[dict]]
Arguments = Callable[[argparse.ArgumentParser], None]

Reporter = Callable[[list[dict], "Path | None"], str]

SCENARIOS: dict[str, tuple[Scenario, Arguments]] = {}
REPORTERS: dict[str, Reporter] = {}


def scenario(name: str, arguments: Arguments, reporter: Reporter | None = None) -> Callable[[Scenario], Scenario]:
    """Register the decorated function as the scenario ``name`` (its docstring is its help);
    ``arguments(parser)`` adds its options to its subcommand. ``reporter(entries, plots)``, when
    given, writes its report from all its records (and its plots into the ``plots`` directory)
    in place of the table of the latest commit's figures."""

    def register(function: Scenario) -> Scenario:
        if name in SCENARIOS:
            raise ValueError(f"benchmark scenario {name!r} is registered twice")
        SCENARIOS[name] = (function, arguments)
        if reporter is not None:
            REPORTERS[name] = reporter
        return function

    return register


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


def simulate_once(run_config: str, timeout: float = 3600, preset: str | None = None, checkout: Path = REPO) -> dict:
    """Run `fedlearn simulate` in a subprocess; return its summary, metrics and peak RSS (and
    the cluster membership when the strategy writes one). ``checkout``: the source tree that
    runs (another commit's worktree, to compare against it)."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONPATH": str(checkout)}
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "simulations.cli", "simulate", "--run-config", run_config, "--out", out]
        command += ["--preset", preset] if preset else []
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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
        from fedlearn.runs import printed_run_dir

        run_dir = printed_run_dir(stdout)
        clusters = run_dir / "clusters.json"
        audit = run_dir / "audit.jsonl"
        return {
            "audit": audit.read_text() if audit.is_file() else "",
            "clusters": json.loads(clusters.read_text()) if clusters.is_file() else None,
            "summary": json.loads((run_dir / "summary.json").read_text()),
            "metrics": json.loads((run_dir / "metrics.json").read_text()),
            "config": (run_dir / "config.toml").read_text(),
            "peak_rss_mib": round(memory.peak / 2**20, 1),
            "wall_seconds": round(wall, 2),
        }


def stock_flower_once(clients: int, sampled: int, rounds: int, timeout: float = 3600) -> dict:
    """Flower's own simulation of the users-scale job (simulations/bench/stock_flower.py) in a
    subprocess: its round seconds, final accuracy and peak RSS of its process tree."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONPATH": str(REPO),
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    command = [sys.executable, "-m", "simulations.bench.stock_flower", "--clients", str(clients), "--sampled", str(sampled),
               "--rounds", str(rounds)]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        with TreeMemory(proc.pid) as memory:
            stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"stock Flower failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "peak_rss_mib": round(memory.peak / 2**20, 1), "config": " ".join(command[2:])}


def record(scenario: str, figures: dict, run: dict, series: dict | None = None) -> dict:
    """Append one result; ``series`` (per-round values, for plots) is kept beside the figures,
    out of the report's table."""
    entry = {
        "scenario": scenario,
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "figures": figures,
        "config": run["config"],
    }
    if series:
        entry["series"] = series
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(RESULTS_DIR / f"{scenario}.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    return entry



def report(scenario: str, commit: str | None = None, plots: Path | None = None) -> str:
    """A markdown table of a scenario's recorded figures (the latest commit's, by default), or
    its own reporter's page (``plots``: where that writes its figures)."""
    path = RESULTS_DIR / f"{scenario}.jsonl"
    if not path.is_file():
        return f"no results recorded for {scenario} ({path} is missing)"
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if scenario in REPORTERS:
        chosen = [e for e in entries if e["machine"]["commit"] == commit] if commit else entries
        if not chosen:
            return f"no results recorded for {scenario} at commit {commit}"
        return REPORTERS[scenario](chosen, plots)
    commit = commit or entries[-1]["machine"]["commit"]
    rows = [e for e in entries if e["machine"]["commit"] == commit]
    if not rows:
        return f"no results recorded for {scenario} at commit {commit}"
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


def docs_page(scenario: str, commit: str | None = None, directory: Path | None = None) -> str | None:
    """The markdown file `report --docs` writes for a scenario: exactly its report (its plots go
    into ``directory``); None when no results are recorded for it."""
    if not (RESULTS_DIR / f"{scenario}.jsonl").is_file():
        return None
    page = report(scenario, commit, plots=directory)
    return None if page.startswith("no results recorded") else page + "\n"


def write_docs(directory: Path, names: list[str], commit: str | None = None) -> tuple[list[Path], list[str]]:
    """Write ``directory/bench-<scenario>.md`` for each of ``names`` with results; return the files
    written and the names skipped for want of results."""
    written, skipped = [], []
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        page = docs_page(name, commit, directory)
        if page is None:
            skipped.append(name)
            continue
        path = directory / f"bench-{name}.md"
        path.write_text(page)
        written.append(path)
    return written, skipped
