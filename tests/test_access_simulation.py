"""Access control in real Flower rounds (simulation runtime): misbehaving nodes are rejected and
audited, the honest ones carry the round, and the model is exactly what the honest ones make."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.app import signed, train_handler
from crypto import signing
from fedlearn.access import AccessPolicy, sign_run
from fedlearn.audit import read, verify
from fedlearn.config import RunConfig
from fedlearn.errors import AccessDenied
from fedlearn.runs import load_model
from server.app import make_server_app, run_federation
from simulations import engine

# partition -> what that node does (0 and 1 are honest)
ATTACKS = {2: "unknown key", 3: "revoked key", 4: "forged signature", 5: "replay", 6: "other run", 7: "evaluator only"}


def keys_and_policy(tmp_path, num_clients=8):
    keys = tmp_path / "keys"
    policy = AccessPolicy()
    for pid in range(num_clients):
        _, _, key = signing.write_keypair(keys, f"node-{pid}")
        if ATTACKS.get(pid) != "unknown key":
            roles = ("evaluator",) if ATTACKS.get(pid) == "evaluator only" else ("trainer", "evaluator")
            policy.enroll(f"node-{pid}", key.public_key(), roles)
    if num_clients > 3:
        policy.revoke("node-3", "key reported stolen")
    _, _, operator = signing.write_keypair(keys, "operator")
    policy.enroll("operator", operator.public_key(), operator=True)
    policy.save(tmp_path / "policy.toml")
    return keys, operator, policy


def poisoned(msg: Message, reply: Message) -> Message:
    """The reply with weights scaled by 1000, re-signed with the node's own key."""
    arrays = reply.content["arrays"]
    reply.content["arrays"] = ArrayRecord({k: Array(v.numpy() * 1000) for k, v in arrays.items()})
    return reply


def client_app(keys, reference: bool) -> ClientApp:
    """In the reference run, every attacker simply fails instead (the replayer only after round 1)."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        attack = ATTACKS.get(pid)
        server_round = int(msg.content["config"]["server-round"])
        if reference:
            if attack and not (attack == "replay" and server_round == 1):
                raise RuntimeError("this node fails in the reference run")
            return train_handler(msg, context)
        if attack == "other run":
            msg.content["auth"] = ConfigRecord({**dict(msg.content["auth"]), "run-id": "someone-elses-run"})
        if attack == "replay" and server_round > 1:  # node state survives rounds (any actor may run the node)
            kept = {name[len("replay/"):]: rec for name, rec in context.state.items() if name.startswith("replay/")}
            return Message(RecordDict(kept), reply_to=msg)
        reply = train_handler(msg, context)
        if attack == "replay":
            for name, rec in reply.content.items():
                context.state[f"replay/{name}"] = rec
        elif attack == "forged signature":
            poisoned(msg, reply)  # altered after signing: the signature no longer matches
        elif attack in ("unknown key", "revoked key", "evaluator only"):
            key = signing.load_private(keys / f"node-{pid}.key")
            reply = Message(signed(msg, poisoned(msg, reply).content, key), reply_to=msg)
        return reply

    return app


def run(config: RunConfig, app: ClientApp) -> dict:
    summary = {}
    server = make_server_app(config, on_round=lambda r: None, on_finish=summary.update)
    engine.simulate(server, app, config.num_clients)
    assert summary, "the simulation ended without a result"
    return summary


def test_misbehaving_nodes_are_rejected_audited_and_leave_the_model_untouched(tmp_path):
    keys, operator, policy = keys_and_policy(tmp_path)
    # Plain updates: the attacks (NaN, wrong shapes, forged signatures...) are on clear arrays.
    base = RunConfig.from_flat({
        "privacy": "plain", "num-clients": 8, "num-rounds": 3, "min-available-clients": 8,
        "access-policy": str(tmp_path / "policy.toml"), "node-keys-dir": str(keys),
    })
    results = {}
    for name, reference in (("attacked", False), ("reference", True)):
        config = base.replace(out_dir=str(tmp_path / name))
        results[name] = run(config.replace(run_signature=sign_run(config, policy, operator)), client_app(keys, reference))

    attacked, reference = results["attacked"], results["reference"]
    model = load_model(tmp_path / "attacked" / attacked["run_id"] / "model.safetensors")
    expected = load_model(tmp_path / "reference" / reference["run_id"] / "model.safetensors")
    assert all(np.array_equal(model[k], expected[k]) for k in expected), "an attacker changed the model"
    assert attacked["final_accuracy"] == reference["final_accuracy"] > 0.6

    run_dir = tmp_path / "attacked" / attacked["run_id"]
    verdict = verify(run_dir / "audit.jsonl", signing.load_public(run_dir / "audit.pub"))
    assert verdict.ok, verdict.summary()
    records = read(run_dir / "audit.jsonl")
    reasons = {}
    for r in records:
        if r["event"] == "update_rejected":
            reasons.setdefault(r["data"]["partition"], set()).add(r["data"]["reason"].split(":")[0])
    assert reasons == {
        2: {"unknown key " + signing.fingerprint(signing.load_private(keys / "node-2.key"))[:16]},
        3: {"revoked key of 'node-3' (key reported stolen)"},
        4: {"bad signature"},
        5: {"wrong round"},
        6: {"wrong run"},
        7: {"role"},
    }
    accepted = [(r["round"], r["data"]["node"]) for r in records if r["event"] == "update_accepted"]
    assert accepted == [(1, "node-0"), (1, "node-1"), (1, "node-5"), (2, "node-0"), (2, "node-1"), (3, "node-0"), (3, "node-1")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [(m["clients"], m["rejected"]) for m in metrics[1:]] == [(3, 5), (2, 6), (2, 6)]
    final = [r for r in records if r["event"] == "run_end"][-1]["data"]["final_model"]
    from crypto.digest import arrays_digest

    assert final == arrays_digest(model), "the logged final model is the saved one"


class NodesOnly:
    """Enough of a Grid for a run that must stop before round 1."""

    def get_node_ids(self):
        return [1, 2]


@pytest.mark.parametrize("signature", ["", "forged"])
def test_unauthorised_run_is_refused_before_round_one_and_audited(tmp_path, signature):
    keys, operator, policy = keys_and_policy(tmp_path, num_clients=2)
    config = RunConfig.from_flat({"num-clients": 2, "access-policy": str(tmp_path / "policy.toml"),
                                  "out-dir": str(tmp_path / "runs")})
    if signature == "forged":
        signature = sign_run(config.replace(num_rounds=99), policy, operator)  # signed a different config
    config = config.replace(run_signature=signature)
    with pytest.raises(AccessDenied, match="run refused: .*audited in"):
        run_federation(NodesOnly(), config, on_round=lambda r: None)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model.safetensors").exists()
    verdict = verify(run_dir / "audit.jsonl", signing.load_public(run_dir / "audit.pub"))
    assert verdict.ok and [r["event"] for r in verdict.events] == ["run_refused"]
    assert ("no run-signature" if not signature else "does not verify") in verdict.events[0]["data"]["reason"]
