import json
import subprocess
import sys

import pytest
from flwr.app import ArrayRecord

from simulations import bench
from simulations.bench import harness

DOCS = harness.REPO / "docs" / "generated"


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)  # where record() and report() read it
    return tmp_path


def test_tree_memory_sees_child_processes():
    # A parent that starts a child holding ~200 MiB: the tree peak must include the child.
    code = (
        "import subprocess, sys; subprocess.run([sys.executable, '-c', "
        "\"b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(1.5)\"])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    with bench.TreeMemory(proc.pid, interval=0.05) as memory:
        proc.wait()
    assert memory.peak > 200 * 2**20


@pytest.mark.slow
def test_scale_scenario_appends_a_record(results_dir):
    args = bench.build_parser().parse_args(["fedavg-scale", "--clients", "3", "--rounds", "2"])
    entries = bench.SCENARIOS["fedavg-scale"][0](args)
    lines = (results_dir / "fedavg-scale.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == entries[0]
    figures = entries[0]["figures"]
    assert figures["clients"] == 3 and figures["rounds"] == 2
    assert figures["peak_rss_mib"] > 100 and figures["mean_round_seconds_after_first"] > 0
    assert {"torch", "flwr", "cpus", "commit"} <= set(entries[0]["machine"])
    table = bench.report("fedavg-scale")
    assert "| clients |" in table and "| 3 | 2 |" in table


def test_report_without_results(results_dir):
    assert "no results recorded" in bench.report("fedavg-scale")


def test_docs_tables_match_the_recorded_results():
    """docs/generated/bench-<scenario>.md is what `report --docs` writes from the records now, for
    every scenario with results: a new record, or a hand edit, fails here until regenerated."""
    stale = []
    for name in bench.SCENARIOS:
        page = bench.docs_page(name)
        path = DOCS / f"bench-{name}.md"
        if page is not None and (not path.is_file() or path.read_text() != page):
            stale.append(path.name)
    assert not stale, f"out of date: {', '.join(stale)}; run `python -m simulations.bench report --docs docs/generated`"


def test_docs_are_written_only_for_scenarios_with_results(results_dir, tmp_path_factory, capsys):
    (results_dir / "fedavg-scale.jsonl").write_text(json.dumps(
        {"scenario": "fedavg-scale", "when": "2025-01-01T00:00:00+00:00", "config": "",
         "machine": {"commit": "abc1234", "cpus": 2, "torch": "2", "flwr": "1"}, "figures": {"clients": 3}}) + "\n")
    docs = tmp_path_factory.mktemp("docs")
    assert bench.main(["report", "--docs", str(docs), "fedavg-scale", "mcmahan"]) == 0
    assert [p.name for p in docs.iterdir()] == ["bench-fedavg-scale.md"]
    assert "skipped (no results recorded): mcmahan" in capsys.readouterr().out
    assert (docs / "bench-fedavg-scale.md").read_text() == bench.report("fedavg-scale") + "\n"
    everything = tmp_path_factory.mktemp("all")
    assert bench.main(["report", "--docs", str(everything)]) == 0  # no names: every scenario (an empty list used to be refused)
    assert [p.name for p in everything.iterdir()] == ["bench-fedavg-scale.md"]


def test_access_overhead_baseline_switch_is_scoped(tmp_path):
    """The benchmark's baseline arm passes messages through unsigned and writes no audit
    records, and everything is back in force when it ends."""
    from crypto import signing
    from fedlearn.audit import AuditLog
    from server.access import AccessGrid

    class Echo:
        def send_and_receive(self, messages, *, timeout=None):
            return list(messages)

    original = AccessGrid.send_and_receive, AuditLog.append, AuditLog.sync
    log = AuditLog(tmp_path / "audit.jsonl", signing.generate(), "run")
    grid = AccessGrid(Echo(), policy=None, audit=log, run_id="run", model=ArrayRecord())
    with bench.without_access_control():
        assert grid.send_and_receive(["untouched"]) == ["untouched"]
        log.append("run_start", 0, {})
    assert (tmp_path / "audit.jsonl").read_bytes() == b""
    assert (AccessGrid.send_and_receive, AuditLog.append, AuditLog.sync) == original
    log.append("run_start", 0, {})
    assert (tmp_path / "audit.jsonl").read_bytes().count(b"\n") == 1


def test_the_bare_loop_and_fedlearns_train_the_same_weights():
    """The throughput comparison is like for like: same batches, optimizer and loss, so from the
    same start the two loops end at the same weights; only the bookkeeping differs."""
    import copy

    import torch

    from fedlearn import models
    from fedlearn.config import RunConfig
    from simulations import throughput

    config = RunConfig.from_flat({"model": "mnist-cnn", "dataset": "mnist", "batch-size": 32, "privacy": "plain", "device": "cpu"})
    split = throughput.random_split((1, 28, 28), 80)
    bare = models.build("mnist-cnn", (1, 28, 28), 10, seed=0)
    ours = copy.deepcopy(bare)
    throughput.bare_loop(bare, split, config, torch.device("cpu"), seed=5)
    throughput.fedlearn_loop(ours, split, config, torch.device("cpu"), seed=5)
    for name, value in bare.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.slow
def test_throughput_scenario_records_both_loops(results_dir):
    args = bench.build_parser().parse_args(
        ["throughput", "--models", "mnist-cnn", "--examples", "64", "--batch-size", "32", "--repeats", "1", "--device", "cpu"])
    entries = bench.SCENARIOS["throughput"][0](args)
    figures = entries[0]["figures"]
    assert figures["bare_samples_per_s"] > 0 and figures["fedlearn_samples_per_s"] > 0
    assert figures["fedlearn_vs_bare"] == pytest.approx(figures["fedlearn_samples_per_s"] / figures["bare_samples_per_s"], rel=0.01)
    assert "amp_vs_fp32" not in figures  # CPU trains in fp32 only
    assert json.loads((results_dir / "throughput.jsonl").read_text().splitlines()[0]) == entries[0]


def test_threshold_ops_scenario_measures_and_checks_the_sum(results_dir):
    from tests.helpers import needs_openfhe

    needs_openfhe()
    args = bench.build_parser().parse_args(["threshold-ops", "--params", "5000", "--clients", "3"])
    figures = bench.SCENARIOS["threshold-ops"][0](args)[0]["figures"]
    assert figures["ciphertexts_per_client"] == 2 and figures["max_abs_error"] <= figures["error_bound"]
    assert figures["value_bits"] == 27  # the widest whose sum of 3 fits 29 bits
    assert figures["upload_bytes_per_param"] > 8  # ciphertexts, not floats
    assert (results_dir / "threshold-ops.jsonl").is_file()


def _mcmahan_entry(lr, seed, rounds, epochs=1, batch=10, commit="abc1234"):
    from simulations.bench import mcmahan

    figures = {"model": "2nn", "partition": "iid", "strategy": "fedavg", "E": epochs, "B": batch, "u": 60, "lr": lr,
               "server_lr": None, "input_scaling": "standard", "seed": seed, "target": 0.97, "rounds_to_target": rounds,
               "paper_rounds": mcmahan.paper_rounds("2nn", epochs, batch, "iid"), "max_rounds": 111,
               "best_accuracy": 0.97 if rounds else 0.9, "seconds_per_round": 1.0, "wall_seconds": 9.0}
    curve = [0.9] * ((rounds or 111) - 1) + [0.97 if rounds else 0.9]
    return {"scenario": "mcmahan", "when": "2026-12-04T00:00:00+00:00", "config": "", "figures": figures,
            "machine": {"commit": commit, "cpus": 2, "torch": "2", "flwr": "1"}, "series": {"accuracy": curve}}


def test_mcmahan_report_takes_each_rows_best_rate_and_draws_the_curves(results_dir, tmp_path_factory):
    from simulations.bench import mcmahan

    entries = [_mcmahan_entry(0.05, 42, 95), _mcmahan_entry(0.05, 43, None), _mcmahan_entry(0.05, 44, 90),
               _mcmahan_entry(0.1, 42, 80), _mcmahan_entry(0.1, 43, None), _mcmahan_entry(0.1, 44, None),
               _mcmahan_entry(0.1, 42, 20, epochs=20, batch=10, commit="old0000"),
               _mcmahan_entry(0.1, 42, 40, epochs=20, batch=10),
               _mcmahan_entry(0.2, 42, 45, epochs=20, batch=10, commit="new1111")]
    entries.append(_mcmahan_entry(0.1, 42, 70))  # records made before model-init existed: pytorch
    entries[-1]["figures"].update(init="truncated-normal", input_scaling="unit")
    for server_lr, rounds in ((1.0, 60), (0.3, 50)):  # a server lr tried is a row of its own
        entries.append(_mcmahan_entry(0.05, 42, rounds))
        entries[-1]["figures"].update(strategy="fedavgm", server_lr=server_lr)
    (results_dir / "mcmahan.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    lr, ours, chosen = mcmahan.best_rate([e for e in entries[:6]])
    assert (lr, ours, len(chosen)) == (0.05, 95, 3)  # lr 0.1's median is "never"
    plots = tmp_path_factory.mktemp("plots")
    page = bench.report("mcmahan", plots=plots)
    assert "| 2nn | IID | fedavg | 1 | 10 | 60 | standard, pytorch | 92 | 95 | 0.05 | 0.05, 0.1 | 3 |" in page
    assert "within 20%" in page
    # lr 0.1 seed 42 counts its latest run only; lr 0.2, measured at a later commit, joins the grid
    assert "| 2nn | IID | fedavg | 20 | 10 | 60 | standard, pytorch | 32 | 40 | 0.1 | 0.1, 0.2 | 1 |" in page
    assert "| abc1234, new1111 |" in page
    assert "| 2nn | IID | fedavg | 1 | 10 | 60 | unit, truncated-normal | 92 | 70 | 0.1 | 0.1 | 1 |" in page
    assert "| fedavgm (server lr 1.0) | 1 | 10 | 60 | standard, pytorch | 92 | 60 |" in page
    assert "| fedavgm (server lr 0.3) | 1 | 10 | 60 | standard, pytorch | 92 | 50 |" in page
    assert "| 25% more rounds |" in page
    assert sorted(p.name for p in plots.iterdir()) == ["mcmahan-2nn-iid-ablations.png", "mcmahan-2nn-iid.png"]
    assert mcmahan.verdict(None, 92, 111) == "not reached in 111 rounds"
    assert mcmahan.verdict(31, 92, 111) == "3.0x fewer rounds" and mcmahan.verdict(60, 92, 111) == "35% fewer rounds"
    assert mcmahan.verdict(200, 92, 300) == "2.2x more rounds" and mcmahan.verdict(110, 92, 111) == "within 20%"
