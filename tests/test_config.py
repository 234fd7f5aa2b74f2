import tomllib

import pytest

from fedlearn.config import RunConfig, load_toml, parse_overrides, resolve
from fedlearn.errors import ConfigError
from tests.conftest import REPO


def problems(**flat) -> str:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat({k.replace("_", "-"): v for k, v in flat.items()})
    return "\n".join(info.value.problems)


def test_defaults_are_valid():
    RunConfig().validate()


def test_pyproject_flower_defaults_match_runconfig():
    app_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == RunConfig().to_flat()


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
    assert "expected float" in problems(lr=float("nan"))


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
    from fedlearn import data, models, strategies
    from fedlearn.config import DATASETS, MODELS, STRATEGIES

    assert set(DATASETS) == set(data.SPECS)
    assert set(MODELS) == set(models.REGISTRY)
    assert set(STRATEGIES) == set(strategies.CLASSES)


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
