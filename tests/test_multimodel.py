"""multimodel: several architectures in one run, each averaged over the clients that trained it;
with every client training every model, each model is exactly its own FedAvg run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlearn import multimodel, packing
from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError
from fedlearn.messages import NODE_RECORD, PARTITION_KEY
from fedlearn.runs import load_model
from fedlearn.updates import Rejected, check_models_update
from tests.helpers import message, run_simulation

MULTI = {"strategy": "multimodel", "models": "logreg,mlp,mnist-cnn", "privacy": "plain"}


def config(**overrides) -> RunConfig:
    return RunConfig.from_flat({**MULTI, **overrides})


def test_packing_round_trips_and_names_what_is_missing_or_foreign():
    states = {"a": {"w": np.ones(2, np.float32)}, "b": {"w": np.zeros(3, np.float32), "v": np.arange(2.0)}}
    record = packing.pack(states)
    assert sorted(record) == ["a/w", "b/v", "b/w"]
    back = packing.unpack(record, ["a", "b"])
    np.testing.assert_array_equal(back["b"]["v"], states["b"]["v"])
    assert packing.unpack({k: v.numpy() for k, v in record.items()}, ["a", "b"])["a"]["w"].shape == (2,)
    with pytest.raises(ValueError, match="no arrays for model"):
        packing.unpack(packing.pack({"a": states["a"]}), ["a", "b"])
    assert set(packing.unpack(packing.pack({"a": states["a"]}), ["a", "b"], complete=False)) == {"a"}
    with pytest.raises(ValueError, match="not <model>/<name>"):
        packing.unpack(record, ["a"])


@given(st.dictionaries(
    st.text("abcxyz-", min_size=1, max_size=6),
    st.dictionaries(st.text("wbv.0123", min_size=1, max_size=6), st.integers(0, 4), min_size=1, max_size=4),
    min_size=1, max_size=4,
))
def test_packing_round_trips_any_models(layout):
    """Property: any set of models (names without the separator) packs and unpacks unchanged."""
    rng = np.random.default_rng(0)
    states = {m: {n: rng.normal(size=(size,)).astype(np.float32) for n, size in arrays.items()} for m, arrays in layout.items()}
    back = packing.unpack(packing.pack(states), list(states))
    assert set(back) == set(states)
    for model, arrays in states.items():
        assert set(back[model]) == set(arrays)
        for name, value in arrays.items():
            np.testing.assert_array_equal(back[model][name], value)


def test_each_round_every_model_gets_clients():
    cfg = config(**{"models-per-client": 1})
    for server_round in range(1, 4):
        chosen = [multimodel.assignment(cfg, pid, server_round) for pid in range(cfg.num_clients)]
        assert all(len(c) == 1 for c in chosen)
        assert {c[0] for c in chosen} == {"logreg", "mlp", "mnist-cnn"}
    assert multimodel.assignment(config(), 4, 1) == ["logreg", "mlp", "mnist-cnn"]  # 0: all of them


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"models": "mlp"}, "needs models= two or more different architectures"),
        ({"models": "mlp,mlp"}, "needs models= two or more different architectures"),
        ({"models": "mlp,transformer"}, "unknown model"),
        ({"models-per-client": 4}, "models-per-client=4: must be between 1 and 3"),
        ({"models-per-client": 1, "privacy": "secagg"}, "models-per-client=1 cannot work with privacy=secagg"),
        ({"strategy": "fedavg", "models": "mlp,logreg"}, "models=mlp,logreg only applies to strategy=fedmd or multimodel"),
        ({"strategy": "fedavg", "models": "", "models-per-client": 2}, "models-per-client=2 only applies"),
    ],
)
def test_config_errors_name_the_problem(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        config(**overrides)


def test_a_multimodel_update_must_hold_whole_models_of_the_run():
    packed = packing.pack({"a": {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}, "c": {"w": np.zeros(3, np.float32)}})

    def content(arrays):
        return RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()})})

    check_models_update(content({"c/w": [1, 2, 3]}), packed)
    check_models_update(content({"a/w": [1, 2], "a/b": [0], "c/w": [1, 2, 3]}), packed)
    for bad, reason in [({}, "none of the run's models"), ({"a/w": [1, 2]}, "instead of the model's"),
                        ({"x/w": [1]}, "instead of the model's"), ({"c/w": [1, 2]}, "c/w is float32")]:
        with pytest.raises(Rejected, match=reason):
            check_models_update(content(bad), packed)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # run_identity is constant
@given(st.lists(st.tuples(st.sets(st.sampled_from(["a", "b", "c"]), min_size=1), st.integers(1, 40), st.floats(-5, 5)),
                min_size=1, max_size=8))
def test_each_model_is_the_weighted_mean_of_the_clients_that_trained_it(run_identity, replies):
    current = {name: {"w": np.full(3, 50.0, np.float32)} for name in "abc"}
    strategy = multimodel.MultiModel(["a", "b", "c"], fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
                                     min_available_nodes=1)
    strategy._current = packing.pack(current)
    messages = [
        message(RecordDict({
            "arrays": packing.pack({name: {"w": np.full(3, value, np.float32)} for name in names}),
            "metrics": MetricRecord({"num-examples": n, "loss": 0.5}),
            NODE_RECORD: ConfigRecord({PARTITION_KEY: i}),
        }), src=10 + i)
        for i, (names, n, value) in enumerate(replies)
    ]
    packed, metrics = strategy.aggregate_train(1, messages)
    result = packing.unpack(packed, ["a", "b", "c"])
    for name in "abc":
        mine = [(n, v) for names, n, v in replies if name in names]
        expected = sum(n * v for n, v in mine) / sum(n for n, _ in mine) if mine else 50.0
        np.testing.assert_allclose(result[name]["w"], expected, rtol=1e-5, atol=1e-5)
        assert strategy.trained[1][name] == len(mine)
    assert metrics["loss"] == pytest.approx(0.5)


@pytest.mark.slow
def test_every_model_of_a_multimodel_run_is_its_own_fedavg_run(tmp_path):
    """Differential, real Flower simulations: a multimodel run of two architectures, every client
    training both, ends with each model equal bit for bit to a FedAvg run of that model alone; the
    run records each model's accuracy and saves each model in its own file."""
    base = {"privacy": "plain", "num-clients": 3, "num-rounds": 2, "out-dir": str(tmp_path)}
    summary, _ = run_simulation(RunConfig.from_flat({**base, "strategy": "multimodel", "models": "logreg,mlp"}))
    run_dir = tmp_path / summary["run_id"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics[-1]["model_accuracy"]) == {"logreg", "mlp"}
    assert metrics[-1]["accuracy"] == pytest.approx(np.mean(list(metrics[-1]["model_accuracy"].values())))
    for name in ("logreg", "mlp"):
        alone, _ = run_simulation(RunConfig.from_flat({**base, "model": name}))
        expected = load_model(tmp_path / alone["run_id"] / "model.safetensors")
        got = load_model(run_dir / f"model-{name}.safetensors")
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
        assert alone["final_accuracy"] == pytest.approx(metrics[-1]["model_accuracy"][name])


@pytest.mark.slow
def test_clients_training_one_model_each_in_a_flower_simulation(tmp_path):
    cfg = config(**{"num-clients": 3, "num-rounds": 3, "models-per-client": 1, "out-dir": str(tmp_path)})
    summary, recorder = run_simulation(cfg, record=True)
    updates = [m for m in recorder.received if m.metadata.message_type == "train"]
    assert all(len({k.split("/")[0] for k in m.content["arrays"]}) == 1 for m in updates)
    ends = [json.loads(line) for line in (tmp_path / summary["run_id"] / "audit.jsonl").read_text().splitlines()]
    ends = [r["data"] for r in ends if r["event"] == "round_end"]
    assert all(r["trained"] == {"logreg": 1, "mlp": 1, "mnist-cnn": 1} for r in ends)
    assert all(set(r["model_accuracy"]) == {"logreg", "mlp", "mnist-cnn"} for r in ends)


@pytest.mark.slow
def test_multimodel_under_secagg_matches_plain(tmp_path):
    """Every client training every model: the packed models are one masked sum, and each model's
    accuracy under secagg is plain's within the encoding's rounding."""
    base = {**MULTI, "num-clients": 4, "num-rounds": 3, "out-dir": str(tmp_path)}
    plain, _ = run_simulation(RunConfig.from_flat(base))
    masked, _ = run_simulation(RunConfig.from_flat({**base, "privacy": "secagg"}))
    accuracy = {name: json.loads((tmp_path / s["run_id"] / "metrics.json").read_text())[-1]["model_accuracy"]
                for name, s in (("plain", plain), ("secagg", masked))}
    for model, value in accuracy["plain"].items():
        assert accuracy["secagg"][model] == pytest.approx(value, abs=0.02)
