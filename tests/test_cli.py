"""The `fedlearn` command and `flwr run .` as a user runs them, in subprocesses."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedlearn.runs import printed_run_dir
from simulations.processes import is_alive
from simulations.cli import main as cli
from tests.helpers import ENV, FEDLEARN, REPO, audit_verdict, run_command


def test_simulate_command_prints_run_dir_last(tmp_path):
    result = run_command([*FEDLEARN, "simulate", "--run-config", "num-rounds=2 num-clients=3", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    run_dir = printed_run_dir(result.stdout)
    assert f"fedlearn audit verify {run_dir} --key" in result.stdout and str(run_dir / "accuracy.png") in result.stdout
    assert run_dir.parent == tmp_path and (run_dir / "summary.json").is_file()
    assert "round   2" in result.stdout and "final accuracy" in result.stdout
    assert "DEPRECATED" not in result.stdout + result.stderr
    # The first line says how clients train, and that the values are the recipe's (none was set).
    assert result.stdout.splitlines()[0] == ("local training: optimizer=momentum momentum=0.9 lr=0.05 local-epochs=2 "
                                             "batch-size=16 (optimizer, lr, local-epochs, batch-size: recommended for mlp on digits)")
    assert 'optimizer = "momentum"' in (run_dir / "config.toml").read_text()
    # The run's audit log verifies, and names the saved model as the final aggregate.
    verified = run_command([*FEDLEARN, "audit", "verify", run_dir / "audit.jsonl", "--key", run_dir / "audit.pub",
                            "--model", run_dir / "model.safetensors"], timeout=60)
    assert verified.returncode == 0 and verified.stdout.startswith("OK: "), verified.stdout + verified.stderr
    assert "2 rounds" in verified.stdout
    digest = run_command([*FEDLEARN, "audit", "digest", run_dir / "model.safetensors"], timeout=60).stdout.strip()
    final = json.loads((run_dir / "audit.jsonl").read_text().splitlines()[-1])
    assert final["event"] == "run_end" and final["data"]["final_model"] == digest


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run-config", "bogus-key=1"], "unknown key 'bogus-key'"),
        (["--run-config", "num-rounds=0"], "num-rounds=0: must be >= 1"),
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--run-config", "dataset=mnist data-dir=/nonexistent"], "data directory /nonexistent (from data-dir) does not exist"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, args, message):
    result = run_command([*FEDLEARN, "simulate", *args, "--out", str(tmp_path)], timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "a failed config must not create a run directory"


def _mistakes(tmp: Path) -> list[tuple[list[str], str]]:
    """Each mistake the issue reports (#21) that reached a traceback, a late failure or a wrong
    message, and the one-line error it gets now. ``tmp`` holds a file, a binary and an empty file."""
    a_file, binary, empty = tmp / "a-file", tmp / "binary.toml", tmp / "empty.jsonl"
    return [
        (["simulate", "--out", str(a_file)], f"out-dir (--out) {a_file} is a file, not a directory"),
        (["simulate", "--run-config", "out-dir=/proc/fedlearn-x"], "cannot write in /proc"),
        (["simulate", "--run-config", "seed=-1"], "seed=-1"),
        (["simulate", "--run-config", "lr=nan"], "must be a finite number, not nan or inf"),
        (["simulate", "--run-config", "lr='0.1"], "No closing quotation"),
        (["simulate", "--run-config", "lr=0.1 lr=0.2"], "gives lr twice"),
        (["simulate", "--preset", str(binary)], "is not UTF-8 text"),
        (["keys", "generate", "--out", str(a_file), "--name", "n"], "is a file, not a directory"),
        (["keys", "he-generate", "--out", "/proc/fedlearn-x"], "cannot write in /proc"),
        (["keys", "list", "--policy", str(binary)], "is not UTF-8 text"),
        (["certs", "generate", "--out", str(tmp / "certs"), "--days", "99999999"], "give 1 to 36500 days"),
        (["decrypt-model", str(tmp), "--key", str(a_file), "--out", str(a_file)], "already exists"),
        (["audit", "show", str(empty)], "holds no audit record"),
        (["audit", "show", str(binary)], "holds no audit record"),
        (["audit", "show", str(tmp)], "is a directory without audit.jsonl"),
        (["resume", str(tmp)], "not a run directory"),
    ]


def test_each_reported_mistake_gets_a_one_line_error_and_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    before = sorted(tmp_path.rglob("*"))
    for argv, message in _mistakes(tmp_path):
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even an empty folder

    monkeypatch.setenv("FEDLEARN_DATA_DIR", str(tmp_path / "a-file"))
    assert cli(["simulate", "--run-config", "dataset=mnist", "--out", str(tmp_path / "runs")]) == 2
    assert "(from FEDLEARN_DATA_DIR) is a file, not a directory" in capsys.readouterr().err


def test_the_bench_command_has_its_own_help_and_name(capsys):
    assert cli(["bench", "--help"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: fedlearn bench") and "secagg-round" in shown
    assert cli(["bench", "nope"]) == 2 and "fedlearn bench: error" in capsys.readouterr().err


def test_list_keys():
    result = run_command([*FEDLEARN, "simulate", "--list-keys"], timeout=60)
    assert result.returncode == 0 and "proximal-mu = 0.0" in result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop_processes_mentioning(marker: str) -> None:
    procs = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for proc in procs:
        for child in proc.children(recursive=True):
            child.kill()
        proc.kill()
    psutil.wait_procs(procs, timeout=10)


@pytest.mark.parametrize("privacy", ["plain", pytest.param("he", marks=pytest.mark.slow)])
def test_flwr_run_uses_the_same_app_and_keys(tmp_path, privacy):
    flwr_home = tmp_path / "flwr-home"
    out = tmp_path / "runs"
    http_port, control_port = _free_port(), _free_port()
    # `flwr run` starts a local SuperLink in the background; give it ports of its own.
    env = {**ENV, "FLWR_HOME": str(flwr_home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}
    try:
        result = run_command(
            [str(Path(sys.executable).parent / "flwr"), "run", ".", "--stream",
             "--federation-config", "num-supernodes=3",
             "--run-config", f"num-rounds=2 num-clients=3 privacy='{privacy}' out-dir='{out}'"],
            env=env,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs = list(out.iterdir())
        assert len(runs) == 1
        metrics = json.loads((runs[0] / "metrics.json").read_text())
        # Under he the clients evaluate, after each round: there is no round 0 record.
        assert [m["round"] for m in metrics] == ([1, 2] if privacy == "he" else [0, 1, 2])
        assert metrics[-1]["clients"] == 3
        assert json.loads((runs[0] / "summary.json").read_text())["final_accuracy"] > 0.5
        assert audit_verdict(runs[0]).returncode == 0
    finally:
        _stop_processes_mentioning(str(flwr_home))
        deadline = time.time() + 10
        while _port_open(http_port) and time.time() < deadline:
            time.sleep(0.2)
    assert not _port_open(http_port), "local SuperLink left running"


def test_diverged_round_stops_the_run_and_keeps_what_was_written(tmp_path):
    result = run_command([*FEDLEARN, "simulate", "--run-config", "lr=1e30 optimizer=sgd num-rounds=3 num-clients=3 privacy=plain",
                          "--out", str(tmp_path)])
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: round 1: no client update to aggregate (3 clients failed")
    assert "training diverged; lower lr or set clip-grad-norm" in last
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [(m["round"], m["clients"], m["failures"]) for m in metrics] == [(0, 0, 0), (1, 0, 3)]
    assert not (run_dir / "summary.json").exists()
    verdict = audit_verdict(run_dir)  # intact, but it does not end a run: the run failed
    assert verdict.returncode == 1 and "with a run_end of status 'failed'" in verdict.stdout, verdict.stdout
    assert audit_verdict(run_dir, "--allow-incomplete").returncode == 0
    final = json.loads((run_dir / "audit.jsonl").read_text().splitlines()[-1])
    assert final["event"] == "run_end" and final["data"]["status"] == "failed"
    assert "training diverged" in final["data"]["reason"]


def _in_session(process: psutil.Process, session: int) -> bool:
    try:
        return os.getsid(process.pid) == session and is_alive(process)
    except (OSError, psutil.Error):
        return False


@pytest.mark.slow
def test_ctrl_c_stops_promptly_leaves_no_process_behind_and_consistent_files(tmp_path):
    import signal
    import threading

    proc = subprocess.Popen([*FEDLEARN, "simulate", "--run-config", "num-rounds=500 num-clients=3", "--out", str(tmp_path)],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    running = threading.Event()

    def watch_rounds():
        for line in proc.stdout:
            if line.startswith("round   2"):
                running.set()

    threading.Thread(target=watch_rounds, daemon=True).start()
    try:
        assert running.wait(180), "no round finished within 180 s"
        started = psutil.Process(proc.pid).children(recursive=True)
        assert {"gcs_server", "raylet"} <= {p.name() for p in started}, [p.name() for p in started]
        proc.send_signal(signal.SIGINT)  # mid-round 3
        assert proc.wait(timeout=30) == 130
        assert "interrupted" in proc.stderr.read()
        # Nothing it started outlives it: not Ray's daemons, not its ClientApp actors (all of
        # which stay in the command's session unless they leave it).
        left = [p for p in started if is_alive(p)] + [p for p in psutil.process_iter() if _in_session(p, proc.pid)]
        assert not left, [(p.pid, p.name()) for p in left]
        (run_dir,) = tmp_path.iterdir()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics[-1]["round"] >= 2
        # No run_end: verify says the log is incomplete, and that what is there is intact.
        cut = audit_verdict(run_dir)
        assert cut.returncode == 1 and "incomplete: the log ends after seq" in cut.stdout, cut.stdout
        assert audit_verdict(run_dir, "--allow-incomplete").returncode == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        _stop_processes_mentioning(str(tmp_path))
