"""fedlearn.access: the policy file, enrolment, revocation and run authorisation."""

import re

import pytest

from crypto import signing
from fedlearn.access import AccessPolicy, provision_simulation, role_for, run_digest, sign_run
from fedlearn.config import RunConfig
from fedlearn.errors import AccessDenied, ConfigError


@pytest.fixture
def keys():
    return {name: signing.generate() for name in ("alice", "a", "b", "c")}


def policy_with(keys) -> AccessPolicy:
    policy = AccessPolicy()
    policy.enroll("alice", keys["alice"].public_key(), operator=True)
    policy.enroll("a", keys["a"].public_key(), ("trainer", "evaluator"))
    policy.enroll("b", keys["b"].public_key(), ("evaluator",))
    return policy


def test_policy_roundtrips_through_toml_and_digest_ignores_formatting(tmp_path, keys):
    policy = policy_with(keys)
    policy.revoke("b", "left the consortium")
    path = tmp_path / "policy.toml"
    policy.save(path)
    loaded = AccessPolicy.load(path)
    assert loaded == policy and loaded.digest() == policy.digest()
    path.write_text(path.read_text().replace("\n\n", "\n\n\n"))
    assert AccessPolicy.load(path).digest() == policy.digest()


def test_refusal_reasons(keys):
    policy = policy_with(keys)
    fp = {name: signing.fingerprint(key) for name, key in keys.items()}
    assert policy.refusal(fp["a"], "trainer") is None
    assert "unknown key" in policy.refusal(fp["c"], "trainer")
    assert "role: 'b' may not act as trainer" in policy.refusal(fp["b"], "trainer")
    assert "unknown key" in policy.refusal(fp["alice"], "trainer"), "operators are not nodes"
    policy.revoke(fp["a"][:10], "key leaked")
    assert policy.refusal(fp["a"], "trainer") == "revoked key of 'a' (key leaked)"


def test_only_keyholders_answer_the_threshold_stages(keys):
    """he-threshold's ceremony and decryption are query messages, and yet signed and role-checked:
    a trainer may not join the committee that decrypts its own and others' updates."""
    policy = policy_with(keys)
    policy.enroll("c", keys["c"].public_key(), ("trainer", "keyholder"))
    fp = {name: signing.fingerprint(key) for name, key in keys.items()}
    for kind in ("query.threshold_join", "query.threshold_keygen", "query.threshold_hold",
                 "query.threshold_decrypt", "query.threshold_reveal"):
        assert role_for(kind) == "keyholder"
        assert policy.refusal(fp["c"], role_for(kind)) is None
        assert "may not act as keyholder" in policy.refusal(fp["a"], role_for(kind))
    assert role_for("query") is None and role_for("train.secagg_share") == "trainer"


def test_enroll_and_revoke_refuse_ambiguity(keys):
    policy = policy_with(keys)
    with pytest.raises(AccessDenied, match="name 'a' is already enrolled"):
        policy.enroll("a", keys["c"].public_key(), ("trainer",))
    with pytest.raises(AccessDenied, match="already enrolled as 'a'"):
        policy.enroll("a2", keys["a"].public_key(), ("trainer",))
    with pytest.raises(AccessDenied, match="unknown role 'admin'"):
        policy.enroll("c", keys["c"].public_key(), ("admin",))
    with pytest.raises(AccessDenied, match="needs at least one role"):
        policy.enroll("c", keys["c"].public_key(), ())
    with pytest.raises(AccessDenied, match="no enrolled node match.*enrolled nodes: a, b"):
        policy.revoke("zed", "")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace('"trainer"', '"admin"', 1), "roles must be a list from trainer, evaluator"),
        (lambda t: t.replace('revoked = ""', 'revoked = ""\ncolour = "red"', 1), r"unknown field\(s\) colour"),
        (lambda t: t.replace('key = "', 'key = "AAAA', 1), "key"),
        (lambda t: t.replace('fingerprint = "', 'fingerprint = "00', 1), "fingerprint does not match its key"),
        (lambda t: t + "\n[extra]\nx = 1\n", r"unknown table\(s\) extra"),
        (lambda t: t + "[[node", "not valid TOML"),
    ],
)
def test_malformed_policy_is_refused_with_the_place_and_problem(tmp_path, keys, edit, message):
    path = tmp_path / "policy.toml"
    policy_with(keys).save(path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError, match=message) as info:
        AccessPolicy.load(path)
    assert str(path) in str(info.value)


def test_missing_policy_says_how_to_create_it(tmp_path):
    with pytest.raises(ConfigError, match="does not exist: create it with `fedlearn keys enroll"):
        AccessPolicy.load(tmp_path / "nope.toml")


def test_run_authorisation_binds_the_whole_config(keys):
    policy = policy_with(keys)
    config = RunConfig.from_flat({"num-rounds": 3, "access-policy": "p.toml"})
    signature = sign_run(config, policy, keys["alice"])
    signed = config.replace(run_signature=signature)
    assert run_digest(signed) == run_digest(config), "the signature is not part of what it signs"
    assert policy.authorising_operator(signed, signature).name == "alice"
    changed = signed.replace(num_rounds=4)
    with pytest.raises(AccessDenied, match="does not verify for config digest"):
        policy.authorising_operator(changed, signature)
    with pytest.raises(AccessDenied, match="does not verify"):
        policy.authorising_operator(config, sign_run(config, policy, keys["a"]))  # a node is not an operator
    policy.enroll("c", keys["c"].public_key(), ("trainer",))
    with pytest.raises(AccessDenied, match="or the policy .* changed after signing"):
        policy.authorising_operator(signed, signature)  # a node enrolled after the operator signed
    with pytest.raises(AccessDenied, match="no run-signature"):
        policy.authorising_operator(config, "")
    with pytest.raises(AccessDenied, match="not base64"):
        policy.authorising_operator(config, "%%%")
    with pytest.raises(AccessDenied, match="lists no operator keys"):
        AccessPolicy().authorising_operator(config, signature)


def test_run_signature_needs_a_policy():
    with pytest.raises(ConfigError, match="run-signature is set but access-policy is not"):
        RunConfig.from_flat({"run-signature": "abc"})


def test_simulation_provisioning_derives_every_node_key_from_one_seed_and_signs_the_config(tmp_path, capsys):
    """A 10,000-client simulation wrote 10,000 key files and a 2.4 MB policy before round 1 (15.8 s);
    now one seed file and one policy table stand for every node."""
    config = RunConfig.from_flat({"num-clients": 1000, "privacy": "plain"})
    policy_path, signed = provision_simulation(tmp_path, config)
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["nodes.seed", "operator.key", "operator.pub"]
    assert policy_path.stat().st_size < 2000 and oct((tmp_path / "keys" / "nodes.seed").stat().st_mode)[-3:] == "600"
    policy = AccessPolicy.load(policy_path)
    seed = (tmp_path / "keys" / "nodes.seed").read_bytes()
    key = signing.derived(seed, "node-999")
    # A node is known by the key derived for the partition it reports, and only by it.
    assert policy.node(signing.fingerprint(key), 999).name == "node-999"
    assert policy.refusal(signing.fingerprint(key), "trainer", 999) is None
    assert "unknown key" in policy.refusal(signing.fingerprint(key), "trainer", 5)
    assert "unknown key" in policy.refusal(signing.fingerprint(key), "trainer", 1000)
    assert "unknown key" in policy.refusal(signing.fingerprint(key), "trainer")
    assert "unknown key" in policy.refusal(signing.fingerprint(signing.generate()), "trainer", 999)
    assert policy.authorising_operator(signed, signed.run_signature).name == "simulation-operator"
    from simulations.cli import main as cli

    assert cli(["keys", "list", "--policy", str(policy_path)]) == 0
    assert "simulated node-0 .. node-999  keys derived from keys/nodes.seed  trainer,evaluator,keyholder" in capsys.readouterr().out
    # Another seed under the same policy is refused on load: it would be other nodes.
    (tmp_path / "keys" / "nodes.seed").chmod(0o600)
    (tmp_path / "keys" / "nodes.seed").write_bytes(bytes(32))
    with pytest.raises(ConfigError, match="does not match seed-sha256"):
        AccessPolicy.load(policy_path)


def test_simulation_provisioning_with_key_files_writes_a_key_per_node(tmp_path):
    config = RunConfig.from_flat({"num-clients": 3})
    policy_path, signed = provision_simulation(tmp_path, config, key_files=True)
    policy = AccessPolicy.load(policy_path)
    assert [m.name for m in policy.nodes] == ["node-0", "node-1", "node-2"]
    for i, member in enumerate(policy.nodes):
        key = signing.load_private(tmp_path / "keys" / f"node-{i}.key")
        assert signing.fingerprint(key) == member.fingerprint
    assert signed.access_policy == str(policy_path) and signed.node_keys_dir == str(tmp_path / "keys")
    assert policy.authorising_operator(signed, signed.run_signature).name == "simulation-operator"


@pytest.mark.parametrize("name", ["../../x", "", ".hidden", "a/b", "node 1"])
def test_keys_generate_refuses_a_name_that_is_not_a_file_name_and_writes_nothing(tmp_path, capsys, name):
    from simulations.cli import main as cli

    out = tmp_path / "deep" / "keys"
    assert cli(["keys", "generate", "--out", str(out), "--name", name]) == 2
    assert "is not a file name stem" in capsys.readouterr().err
    assert [p for p in tmp_path.rglob("*")] == []


def test_keys_generate_writes_a_plain_name_inside_out(tmp_path):
    from simulations.cli import main as cli

    assert cli(["keys", "generate", "--out", str(tmp_path), "--name", "node-0.v2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node-0.v2.key", "node-0.v2.pub"]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("nodes = 1000", "nodes = 0"), "nodes must be a whole number >= 1"),
    (lambda t: t.replace('"keyholder"', '"admin"'), "roles must be a non-empty list"),
    (lambda t: t.replace('seed = "keys/nodes.seed"', 'seed = "keys/gone.seed"'), "cannot read the seed"),
    (lambda t: t.replace("[simulated]", "[simulated]\nextra = 1"), "unknown field(s) extra"),
])
def test_a_malformed_simulated_table_is_refused_by_name(tmp_path, edit, message):
    policy_path, _ = provision_simulation(tmp_path, RunConfig.from_flat({"num-clients": 1000, "privacy": "plain"}))
    policy_path.write_text(edit(policy_path.read_text()))
    with pytest.raises(ConfigError, match=re.escape(message)):
        AccessPolicy.load(policy_path)
