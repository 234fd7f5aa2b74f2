"""Killing the server and resuming the run: the checkpoint, `fedlearn resume`, and what a
damaged run directory gets instead (a refusal that changes nothing)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from clients.app import app as client_app
from fedlearn.checkpoint import FILE, Checkpoint
from fedlearn.runs import load_model, load_run_config, printed_run_dir
from server.app import make_server_app
from simulations import engine, simulate
from simulations.cli import config_from_args
from simulations.cli import main as cli
from tests.helpers import ENV, FEDLEARN, audit_verdict, run_command

JOB = "num-rounds=4 num-clients=3 strategy=fedadam privacy=plain"  # fedadam: server state to carry over


def rounds(run_dir: Path) -> list[int]:
    return [m["round"] for m in json.loads((run_dir / "metrics.json").read_text())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same job twice: once straight through, once SIGKILLed after round 2 and resumed."""
    base = tmp_path_factory.mktemp("resume")
    # Straight through in this process (its command line is test_cli's subject), killed as a process.
    simulate.run(config_from_args(None, JOB, str(base / "straight")))
    (straight,) = (base / "straight").iterdir()

    process = subprocess.Popen([*FEDLEARN, "simulate", "--out", str(base / "killed"), "--run-config", JOB],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            found = list((base / "killed").glob("*/checkpoint.safetensors"))
            if found and Checkpoint.load(found[0].parent).round >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint of round 2 within 240 s")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the server dies mid-run, with its simulated clients
        process.wait()
    killed = found[0].parent
    assert not (killed / "summary.json").exists()
    killed_at = Checkpoint.load(killed).round
    snapshot = base / "snapshot"
    shutil.copytree(killed, snapshot)  # the directory as the crash left it, for the refusal tests
    resumed = run_command([*FEDLEARN, "resume", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"after round {killed_at} of 4" in resumed.stderr
    assert printed_run_dir(resumed.stdout) == killed
    return straight, killed, killed_at, snapshot


def test_a_killed_run_resumes_to_the_model_of_an_uninterrupted_run(runs):
    straight, resumed, killed_at, _ = runs
    assert rounds(resumed) == rounds(straight) == [0, 1, 2, 3, 4]
    ours, theirs = load_model(resumed / "model.safetensors"), load_model(straight / "model.safetensors")
    for name in theirs:  # fedadam's moments, the round number and the RNG came back exactly
        np.testing.assert_array_equal(ours[name], theirs[name])
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from_round"] == killed_at and summary["rounds"] == 4


def test_the_resumed_run_continues_the_same_audit_chain(runs):
    _, resumed, killed_at, _ = runs
    assert audit_verdict(resumed, "--model", str(resumed / "model.safetensors")).returncode == 0
    records = [json.loads(line) for line in (resumed / "audit.jsonl").read_text().splitlines()]
    assert len({r["run_id"] for r in records}) == 1
    (restart,) = [r for r in records if r["event"] == "run_resumed"]
    assert restart["data"]["from_round"] == killed_at
    (checkpointed,) = [r for r in records if r["event"] == "round_end" and r["round"] == killed_at]
    assert restart["data"]["checkpoint"] == checkpointed["data"]["checkpoint"]  # the state it resumed from, audited
    closed = [r["round"] for r in records if r["event"] == "round_end"]
    assert closed == [1, 2, 3, 4]
    assert [r["event"] for r in records].count("run_start") == 1 and records[-1]["event"] == "run_end"


def _refused(directory: Path, capsys) -> str:
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    assert cli(["resume", str(directory)]) == 2
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()} == before  # nothing touched
    return capsys.readouterr().err


def test_a_damaged_or_finished_run_is_refused_and_left_as_it_was(runs, tmp_path, capsys):
    straight, _, _, snapshot = runs
    assert "already ran all 4 rounds: nothing to resume" in _refused(straight, capsys)

    tampered = shutil.copytree(snapshot, tmp_path / "tampered")
    lines = (tampered / "audit.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"round_start"', '"round_end"')
    (tampered / "audit.jsonl").write_text("".join(lines))
    assert "does not verify" in _refused(tampered, capsys)

    torn = shutil.copytree(snapshot, tmp_path / "torn")
    with open(torn / "audit.jsonl", "ab") as log:
        log.write(b'{"seq": 99, "ev')
    assert "torn line" in _refused(torn, capsys)

    corrupt = shutil.copytree(snapshot, tmp_path / "corrupt")
    (corrupt / FILE).write_bytes((corrupt / FILE).read_bytes()[:200])
    assert "is damaged" in _refused(corrupt, capsys)

    edited = shutil.copytree(snapshot, tmp_path / "edited")
    (edited / "config.toml").write_text((edited / "config.toml").read_text().replace("num-rounds = 4", "num-rounds = 9"))
    assert "config.toml changed since the checkpoint" in _refused(edited, capsys)

    unlogged = shutil.copytree(snapshot, tmp_path / "unlogged")
    (unlogged / "audit.jsonl").unlink()
    assert "audit.jsonl not found: a resumed run continues its audit log" in _refused(unlogged, capsys)

    for name, text, says in [("garbled", "[{\"round\": 0", "is not a metrics file"), ("emptied", "{}", "holds rounds []"),
                             ("holed", json.dumps(json.loads((snapshot / "metrics.json").read_text())[:1]), "holds rounds [0]")]:
        history = shutil.copytree(snapshot, tmp_path / name)
        (history / "metrics.json").write_text(text)
        assert says in _refused(history, capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a run directory" in _refused(empty, capsys)


def test_a_checkpoint_edited_after_it_was_written_is_refused(runs, tmp_path, capsys):
    """Issue 22 (audit and resume): failed before: an edited checkpoint.safetensors (model,
    strategy state, random state) resumed silently, since only the audit chain's head was
    checked. The round's round_end names both digests now, and a resume compares them."""
    _, _, killed_at, snapshot = runs

    def nudge_model(c):
        name = sorted(c.model)[0]
        c.model[name] = c.model[name] + np.float32(0.01)

    def nudge_moments(c):
        name = sorted(c.strategy)[0]
        c.strategy[name] = c.strategy[name] * 2

    def reseed(c):
        version, state, gauss = c.python_random
        c.python_random = (version, (state[0] ^ 1, *state[1:]), gauss)

    for name, edit, part in [("model", nudge_model, "model"), ("moments", nudge_moments, "state"), ("random", reseed, "state")]:
        edited = shutil.copytree(snapshot, tmp_path / name)
        checkpoint = Checkpoint.load(edited)
        edit(checkpoint)
        checkpoint.save(edited)
        assert f"checkpoint.safetensors was changed after round {killed_at}: its {part} digest" in _refused(edited, capsys)


def _crash_in_round(crash_round: int):
    def on_round(record) -> None:  # after the round's metrics, before its checkpoint: a crash mid-round
        if record.round == crash_round:
            raise RuntimeError("injected crash")
    return on_round


@pytest.mark.slow
@pytest.mark.parametrize("privacy", ["secagg", "he-threshold"])
def test_a_crashed_run_resumes_bit_for_bit_under_a_mode_that_hides_updates(privacy, tmp_path):
    """The server crashes in round 2 and the run is resumed from round 1's checkpoint: the
    final model equals the uninterrupted run's, array for array.

    Failed before the resumed model was put back in the model's own order: safetensors gives a
    checkpoint's arrays back in a random order, and secagg and he-threshold derived the
    per-tensor fixed-point ranges in that order, so resumed rounds clipped tensors with other
    tensors' ranges (three resumes of one secagg checkpoint gave three models)."""
    job = f"num-rounds=3 num-clients=3 privacy={privacy}"
    simulate.run(config_from_args(None, job, str(tmp_path / "straight")))
    (straight,) = (tmp_path / "straight").iterdir()

    config = config_from_args(None, job, str(tmp_path / "crashed"))
    with pytest.raises(RuntimeError, match="injected crash"):
        engine.simulate(make_server_app(config, on_round=_crash_in_round(2)), client_app, config.num_clients)
    (crashed,) = (tmp_path / "crashed").iterdir()
    assert Checkpoint.load(crashed).round == 1
    simulate.run(load_run_config(crashed).replace(resume_from=str(crashed)))

    assert rounds(crashed) == rounds(straight) == [0, 1, 2, 3]
    ours, theirs = load_model(crashed / "model.safetensors"), load_model(straight / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert audit_verdict(crashed, "--model", str(crashed / "model.safetensors")).returncode == 0
