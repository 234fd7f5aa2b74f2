"""`fedlearn keys he-generate` and `fedlearn decrypt-model`, on files made here (no simulation)."""

from __future__ import annotations

import stat

import numpy as np
from safetensors.numpy import save_file

from crypto.he import HEKey
from fedlearn import data, he, models
from fedlearn.config import RunConfig
from fedlearn.runs import load_model
from simulations.cli import main as cli


def test_he_generate_writes_a_secret_and_a_keyless_public_context(tmp_path, capsys):
    assert cli(["keys", "he-generate", "--out", str(tmp_path / "k"), "--max-clients", "20"]) == 0
    secret, public = tmp_path / "k" / "he.secret", tmp_path / "k" / "he.public"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert public.stat().st_size < 400 < secret.stat().st_size
    assert HEKey.load(public, secret=False).info.max_terms == 20
    assert "he-public=" in capsys.readouterr().out
    assert cli(["keys", "he-generate", "--out", str(tmp_path / "k")]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def encrypted_run(tmp_path, scheme="bfv"):
    """A run directory as a privacy=he server leaves it: config.toml and model.he.safetensors."""
    config = RunConfig.from_flat({"privacy": "he", "he-scheme": scheme})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(config.to_toml())
    spec = data.spec(config.dataset)
    template = {k: v.numpy() for k, v in models.build(config.model, spec.shape, spec.num_classes, seed=1).state_dict().items()}
    key = HEKey.generate(scheme, 10)
    codec = he.ModelCodec(key, template, config.he_bits, config.he_range_factor())
    exponents = codec.exponents_for(template)
    parts = [codec.encrypt(he.flatten(template), w, 3, exponents) for w in (1.0, 0.5, 0.25)]
    total = codec.summer(3, exponents).add(parts)
    metadata = {"encrypted": "true", "context_id": key.info.context_id, "scheme": scheme, "bits": "16",
                "terms": "3", "weight": repr(total.weight), "max_terms": "3", "range_exp": ",".join(map(str, exponents))}
    save_file(he.chunks_to_arrays(total.chunks), str(run_dir / "model.he.safetensors"), metadata=metadata)
    key.save(tmp_path / "he.secret")
    key.public().save(tmp_path / "he.public")
    return run_dir, template


def test_decrypt_model_recovers_the_weighted_average(tmp_path):
    run_dir, template = encrypted_run(tmp_path)
    assert cli(["decrypt-model", str(run_dir), "--key", str(tmp_path / "he.secret")]) == 0
    model = load_model(run_dir / "model.safetensors")
    assert set(model) == set(template)
    assert max(np.abs(model[k] - template[k]).max() for k in template) < 1e-3  # same model, averaged


def test_decrypt_model_errors_name_the_problem(tmp_path, capsys):
    run_dir, _ = encrypted_run(tmp_path, scheme="ckks")
    assert cli(["decrypt-model", str(run_dir), "--key", str(tmp_path / "he.public")]) == 2
    assert "wrong kind" in capsys.readouterr().err
    other = tmp_path / "other"
    HEKey.generate("ckks", 10).save(other)
    assert cli(["decrypt-model", str(run_dir), "--key", str(other)]) == 2
    assert "another HE key pair" in capsys.readouterr().err
    assert cli(["decrypt-model", str(tmp_path), "--key", str(other)]) == 2
    assert "privacy=he run" in capsys.readouterr().err
    assert cli(["decrypt-model", str(run_dir), "--key", str(tmp_path / "he.secret")]) == 0
    assert cli(["decrypt-model", str(run_dir), "--key", str(tmp_path / "he.secret")]) == 2  # keeps the first
    assert "already exists" in capsys.readouterr().err
    assert not (run_dir / ".model.safetensors.tmp").exists()


def test_bad_he_key_settings_are_config_errors_that_say_what_to_do(tmp_path):
    import pytest

    from fedlearn.errors import ConfigError
    from server.he import load_public_key

    HEKey.generate("bfv", 5).save(tmp_path / "he.secret")
    HEKey.generate("bfv", 5).public().save(tmp_path / "he.public")
    cases = {
        str(tmp_path / "missing.public"): "does not exist",
        str(tmp_path / "he.secret"): "wrong kind",
    }
    for path, reason in cases.items():
        with pytest.raises(ConfigError, match=reason):
            load_public_key(RunConfig.from_flat({"privacy": "he", "he-public": path}))
    with pytest.raises(ConfigError, match="he-scheme=ckks"):
        load_public_key(RunConfig.from_flat({"privacy": "he", "he-scheme": "ckks", "he-public": str(tmp_path / "he.public")}))
    with pytest.raises(ConfigError, match="--max-clients 10"):
        load_public_key(RunConfig.from_flat({"privacy": "he", "he-public": str(tmp_path / "he.public")}))
    policy = tmp_path / "policy.toml"
    policy.write_text("")
    with pytest.raises(ConfigError, match="fedlearn keys he-generate"):
        load_public_key(RunConfig.from_flat({"privacy": "he", "access-policy": str(policy)}))
