import os
import re
import subprocess
import sys
import tomllib
from dataclasses import fields

import pytest

from fedlearn import config as config_module
from fedlearn import families, privacy
from fedlearn.config import RunConfig, key_reference, load_toml, parse_overrides, reference_markdown, resolve
from fedlearn.errors import ConfigError
from tests.helpers import REPO


def problems(**flat) -> str:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat({k.replace("_", "-"): v for k, v in flat.items()})
    return "\n".join(info.value.problems)


def test_defaults_are_valid():
    RunConfig().validate()


def test_input_scaling_is_a_choice_for_the_image_files_only():
    assert "input-scaling='zscore': choose one of standard, unit" in problems(input_scaling="zscore")
    assert "input-scaling=unit with dataset=digits: only the image files" in problems(input_scaling="unit")
    RunConfig.from_flat({"dataset": "mnist", "input-scaling": "unit"})


def test_pyproject_flower_defaults_match_runconfig():
    app_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = {info.key: info.default for info in key_reference()}  # as declared (auto, before the recipe fills it)
    assert not set(defaults) - set(app_config), f"[tool.flwr.app.config] lacks {sorted(set(defaults) - set(app_config))}"
    assert not set(app_config) - set(defaults), f"[tool.flwr.app.config] has unknown {sorted(set(app_config) - set(defaults))}"
    # Same values and the same TOML types (an int where RunConfig has a float would still compare equal).
    differ = {k: (app_config[k], v) for k, v in defaults.items() if (app_config[k], type(app_config[k])) != (v, type(v))}
    assert not differ, f"[tool.flwr.app.config] differs from RunConfig's defaults (pyproject, RunConfig): {differ}"


def test_flat_roundtrip_and_digest_stable():
    config = RunConfig.from_flat({"num-rounds": 3, "lr": "0.5", "strategy": "fedadam"})
    assert config.num_rounds == 3 and config.lr == 0.5
    again = RunConfig.from_flat(config.to_flat())
    assert again == config and again.digest() == config.digest()
    assert config.digest() != RunConfig().digest()


def test_toml_output_parses_back():
    config = RunConfig.from_flat({"data-dir": 'we"ird\\path', "seed": 7})
    assert RunConfig.from_flat(tomllib.loads(config.to_toml())) == config


def test_unknown_key_names_it_and_suggests():
    message = problems(num_round=3)
    assert "unknown key 'num-round'" in message and "num-rounds" in message


def test_bad_type_and_choice():
    assert "expected int" in problems(num_rounds="many")
    assert "choose one of sgd, momentum, adam" in problems(optimizer="rmsprop")
    assert "must be in (0, 1]" in problems(fraction_train=1.5)
    assert "must be a finite number, not nan or inf" in problems(lr=float("nan"))


def test_all_problems_reported_at_once():
    message = problems(lr=-1, num_clients=0, dataset="imagenet")
    assert "lr=-1" in message and "num-clients=0" in message and "dataset='imagenet'" in message


@pytest.mark.parametrize(
    "flat, fragment",
    [
        ({"strategy": "fedprox"}, "needs proximal-mu > 0"),
        ({"proximal-mu": 0.1}, "only applies to strategy=fedprox"),
        ({"model": "vision-cnn", "dataset": "mnist"}, "divisible by 8"),
        ({"strategy": "krum", "num-clients": 4, "krum-malicious": 1}, "needs more than 4 sampled clients"),
        ({"partitioner": "shards", "num-clients": 1000, "shards-per-client": 2}, "2000 shards"),
        ({"min-available-clients": 20}, "exceeds num-clients=10"),
        ({"privacy": "dp"}, "privacy='dp': choose one of plain, he, secagg, he-threshold"),
        ({"privacy": "secagg", "strategy": "krum"}, "shows the server only the sum"),
        ({"privacy": "secagg", "secagg-bits": 40}, "secagg-bits=40: must be between 8 and 32"),
        ({"privacy": "secagg", "secagg-bits": 8, "num-clients": 100}, "leaves 2 bits per value for a sum of 100 clients"),
        ({"privacy": "secagg", "secagg-threshold": 11}, "secagg-threshold=11: must be between 2 and the 10 clients"),
        ({"privacy": "secagg", "secagg-threshold": 1}, "secagg-threshold=1"),
        ({"privacy": "secagg", "num-clients": 20, "secagg-neighbours": 4, "secagg-threshold": 6}, "the 5 clients of a neighbourhood"),
        ({"privacy": "secagg", "num-clients": 1, "min-available-clients": 1}, "needs at least 2 clients per round"),
        ({"privacy": "secagg", "secagg-range": -1}, "secagg-range=-1"),
        ({"dropout-rate": 1.0}, "dropout-rate=1.0: must be in [0, 1)"),
        ({"seed": -1}, "seed=-1: must be between 0 and 4294967295"),
        ({"lr": "nan"}, "lr='nan': must be a finite number, not nan or inf"),
        ({"server-lr": float("inf")}, "server-lr=inf: must be a finite number"),
        ({"seed": 2**32}, "seed=4294967296: must be between 0 and 4294967295"),
        ({"privacy": "plain", "dropout-stage": "unmask"}, "needs privacy=secagg"),
        ({"strategy": "krum"}, "or privacy=plain to give up secure aggregation"),
        ({"dropout-stage": "later"}, "dropout-stage='later': choose one of"),
        ({"privacy": "he", "he-bits": 40}, "he-bits=40"),
        ({"he-secret": "x.secret"}, "he-secret only applies to privacy=he"),
        ({"privacy": "he", "strategy": "fedadagrad"}, "non-linear step"),
        ({"privacy": "he-threshold", "strategy": "krum"}, "only the sum is ever decrypted"),
        ({"privacy": "he-threshold", "strategy": "ifca"}, "must see every update in clear"),
        ({"privacy": "he-threshold", "threshold-committee": 11}, "threshold-committee=11: must be between 2 and num-clients=10"),
        ({"privacy": "he-threshold", "threshold-committee": 1}, "threshold-committee=1"),
        ({"privacy": "he-threshold", "threshold-committee": 5, "threshold-quorum": 1}, "1 would let one member decrypt alone"),
        ({"privacy": "he-threshold", "threshold-committee": 5, "threshold-quorum": 6}, "threshold-quorum=6"),
        ({"privacy": "he-threshold", "threshold-timeout": 0}, "threshold-timeout=0"),
        ({"privacy": "he-threshold", "threshold-range": -2}, "threshold-range=-2"),
        ({"privacy": "he-threshold", "num-clients": 2, "min-available-clients": 1, "fraction-train": 0.5}, "needs at least 2 clients per round"),
        ({"privacy": "secagg", "dropout-stage": "decrypt"}, "needs privacy=he-threshold"),
    ],
)
def test_impossible_combinations(flat, fragment):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat(flat)
    assert fragment in str(info.value)


@pytest.mark.parametrize("text, fragment", [
    ("data-dir='/a b", "No closing quotation; quote a value with spaces"),
    ("lr=0.1 seed=3 lr=0.2", "run-config gives lr twice; keep one lr=..."),
])
def test_parse_overrides_refuses_unbalanced_quotes_and_repeated_keys(text, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_overrides(text)


def test_parse_overrides_accepts_toml_and_bare_words():
    assert parse_overrides("num-rounds=3 lr=0.1 strategy=fedavg data-dir='/a b'") == {
        "num-rounds": 3,
        "lr": 0.1,
        "strategy": "fedavg",
        "data-dir": "/a b",
    }
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides("num-rounds")


def test_presets_are_valid():
    for path in sorted((REPO / "simulations" / "presets").glob("*.toml")):
        resolve(load_toml(path))


def test_load_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
    nested = tmp_path / "nested.toml"
    nested.write_text("[section]\nx = 1\n")
    with pytest.raises(ConfigError, match="must be flat"):
        load_toml(nested)


def test_replace_validates():
    config = RunConfig()
    assert config.replace(num_rounds=2).num_rounds == 2
    with pytest.raises(ConfigError):
        config.replace(num_rounds=0)


def test_choices_match_the_registries():
    from fedlearn import data, fedavg, models
    from fedlearn.config import DATASETS, MODELS

    assert set(DATASETS) == set(data.SPECS)
    assert set(MODELS) == set(models.REGISTRY)
    flowers = {f.name for f in families.all_families() if f.hooks == "fedlearn.fedavg:FedAvgFamily"}
    assert flowers == set(fedavg.CLASSES)  # every row of Flower's family builds one of its classes


@pytest.mark.parametrize("sampled, neighbours, expected", [(10, 0, 6), (5, 0, 3), (2, 0, 2), (50, 0, 26), (50, 4, 3), (50, 5, 4)])
def test_secagg_threshold_defaults_to_a_majority_of_a_neighbourhood(sampled, neighbours, expected):
    config = RunConfig.from_flat({"privacy": "secagg", "num-clients": sampled, "secagg-neighbours": neighbours})
    assert config.secagg_threshold_for(sampled) == expected


def test_secagg_encoding_leaves_headroom_for_the_sum():
    config = RunConfig.from_flat({"privacy": "secagg", "num-clients": 50})
    encoding = config.secagg_encoding(50)
    assert encoding.sum_bits(50) <= 16 < encoding.__class__(encoding.bits + 1).sum_bits(50)


def test_he_threshold_defaults_to_a_majority_and_the_widest_exact_encoding():
    config = RunConfig.from_flat({"privacy": "he-threshold", "threshold-committee": 5})
    assert config.threshold_quorum_size() == 3 and not config.evaluates_on_clients()  # the server tests the model
    assert config.threshold_encoding(10).bits == 25  # 10 * 2**25 < 2**29: the sum decrypts exactly
    assert RunConfig.from_flat({"privacy": "he-threshold", "strategy": "fedadam"}).strategy == "fedadam"


def test_a_negative_update_limit_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"max-update-mb=-1.0: must be >= 0 \(0 picks a limit from the model size\)"):
        RunConfig.from_flat({"max-update-mb": -1.0})


# -- one source for each key's default and help text -------------------------------------------
def test_every_key_has_help_text():
    missing = [f.name for f in fields(RunConfig) if not str(f.metadata.get("help", "")).strip()]
    assert not missing, f"RunConfig fields without help text (declare them as key(default, help)): {missing}"
    assert [info.key for info in key_reference()] == RunConfig.keys()
    declared = {info.key: info.default for info in key_reference()}
    resolved = RunConfig().to_flat()
    assert {k for k in declared if declared[k] != resolved[k]} == {"optimizer", "lr", "local-epochs", "batch-size"}
    assert {info.type for info in key_reference()} <= {"int", "float", "str"}  # _coerce's types


@pytest.mark.parametrize(
    "key, choices",
    [
        ("optimizer", config_module.OPTIMIZERS),
        ("partitioner", config_module.PARTITIONERS),
        ("device", config_module.DEVICES),
        ("amp", config_module.AMP_MODES),
        ("compile", config_module.COMPILE_MODES),
        ("privacy", privacy.names()),
        ("he-scheme", config_module.HE_SCHEMES),
        ("evaluate-on", config_module.EVALUATE_ON),
        ("dropout-stage", ("train", *(stage for mode in privacy.modes() for stage in mode.stages))),
        ("strategy", families.names()),
        ("dataset", config_module.DATASETS),
        ("model", config_module.MODELS),
        ("model-init", config_module.MODEL_INITS),
    ],
)
def test_help_of_a_choice_key_names_every_choice(key, choices):
    help_text = {info.key: info.help for info in key_reference()}[key]
    unnamed = [c for c in choices if not re.search(rf"(?<![\w-]){re.escape(c)}(?![\w-])", help_text)]
    assert not unnamed, f"the help text of {key} does not name {unnamed}: {help_text!r}"


def test_generated_reference_is_up_to_date():
    path = REPO / "docs" / "generated" / "config-keys.md"
    fix = "run `python -m fedlearn.config --markdown --write docs/generated/config-keys.md`"
    assert path.is_file(), f"{path.relative_to(REPO)} is missing: {fix}"
    assert path.read_text() == reference_markdown(), f"{path.relative_to(REPO)} is out of date: {fix}"


def test_reference_markdown_has_one_row_per_key_in_order():
    rows = [line for line in reference_markdown().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == RunConfig.keys()
    for row, info in zip(rows, key_reference()):
        assert row.replace("\\|", "").count("|") == 5, f"a '|' in the help of {info.key} is not escaped: {row}"


def test_list_keys_prints_every_key_default_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--list-keys"],
        cwd=REPO, env={**os.environ, "COLUMNS": "100"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    flat = " ".join(result.stdout.split())  # help text may wrap onto indented lines
    columns = set()
    for info in key_reference():
        start = f"{info.key} = {info.default!r}"
        first = [line for line in lines if line.startswith(start + " ")]
        assert first, f"--list-keys has no line for {start}"
        columns.add(len(first[0]) - len(first[0][len(start):].lstrip()))
        assert " ".join(info.help.split()) in flat, f"--list-keys lacks the help of {info.key}"
    assert len(columns) == 1, "the help texts of --list-keys do not start in one column"


# -- recommended training (fedlearn.recipes) ---------------------------------------------------
def test_unset_training_keys_take_the_recipe_of_the_model_and_dataset_and_set_ones_stay():
    mnist = RunConfig.from_flat({"dataset": "mnist", "model": "mnist-2nn"})
    assert (mnist.optimizer, mnist.lr, mnist.local_epochs, mnist.batch_size) == ("sgd", 0.05, 1, 32)
    digits = RunConfig()
    assert (digits.optimizer, digits.lr, digits.local_epochs, digits.batch_size) == ("momentum", 0.05, 2, 16)
    cnn = RunConfig.from_flat({"dataset": "synthetic32", "model": "vision-cnn", "batch-size": 8, "lr": 0})
    assert (cnn.optimizer, cnn.lr, cnn.batch_size) == ("adam", 0.001, 8)  # lr=0 asks for the recipe too
    # The resolved values are what the run records (config.toml) and what its digest covers.
    assert 'optimizer = "sgd"' in mnist.to_toml() and RunConfig.from_flat(mnist.to_flat()) == mnist


def test_changing_model_or_dataset_moves_only_the_keys_that_followed_the_old_recipe():
    chosen = RunConfig.from_flat({"lr": 0.2}).replace(dataset="mnist")
    assert (chosen.optimizer, chosen.lr, chosen.local_epochs, chosen.batch_size) == ("sgd", 0.2, 1, 32)
    assert RunConfig().replace(seed=7).lr == 0.05 and RunConfig().replace(seed=7).optimizer == "momentum"
