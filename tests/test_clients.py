"""The ClientApp's handlers called directly, as Flower would call them on a node."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

from clients.app import evaluate_handler, node_task, query_handler, train_handler
from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError, DataError
from server.app import initial_arrays
from tests.helpers import message


def context(**node_config) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def request(config: RunConfig, message_type=MessageType.TRAIN, server_round=1):
    content = RecordDict(
        {"arrays": initial_arrays(config), "config": ConfigRecord({**config.to_flat(), "server-round": server_round})}
    )
    return message(content, message_type=message_type)


CONFIG = RunConfig.from_flat({"privacy": "plain", "num-clients": 4, "model": "logreg", "partitioner": "dirichlet"})


def test_train_reply_carries_update_metrics_and_partition():
    reply = train_handler(request(CONFIG), context(**{"partition-id": 2, "num-partitions": 4}))
    assert not reply.has_error()
    assert reply.content["node"]["partition-id"] == 2
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == len(node_task(request(CONFIG), context(**{"partition-id": 2, "num-partitions": 4})).split)
    sent, got = initial_arrays(CONFIG), reply.content["arrays"]
    assert set(sent) == set(got)
    assert any(not np.array_equal(sent[k].numpy(), got[k].numpy()) for k in sent), "training changed nothing"


def test_evaluate_uses_the_run_config_sent_by_the_server():
    reply = evaluate_handler(request(CONFIG, MessageType.EVALUATE), context(**{"partition-id": 0, "num-partitions": 4}))
    assert 0.0 <= reply.content["metrics"]["accuracy"] <= 1.0


def test_query_reports_partition():
    reply = query_handler(message(RecordDict(), message_type=MessageType.QUERY), context(**{"partition-id": 3}))
    assert reply.content["node"]["partition-id"] == 3


def test_node_without_partition_is_told_how_to_start():
    with pytest.raises(ConfigError, match="--node-config 'partition-id=I num-partitions=N'"):
        train_handler(request(CONFIG), context())


def test_partition_count_must_match_num_clients():
    with pytest.raises(ConfigError, match="num-partitions=2, but the run has num-clients=4.*num-supernodes=4"):
        train_handler(request(CONFIG), context(**{"partition-id": 0, "num-partitions": 2}))


def test_node_overrides_data_dir(tmp_path):
    config = CONFIG.replace(dataset="mnist", model="mnist-2nn", data_dir="/server/side/path")
    with pytest.raises(DataError, match=f"missing file {tmp_path / 'mnist'}"):
        train_handler(request(config), context(**{"partition-id": 0, "num-partitions": 4, "data-dir": str(tmp_path)}))


def test_messages_that_need_no_model_or_data_load_neither():
    """Flower starts a fresh ClientApp process for every message: secure aggregation's key stages
    and the queries must not pay for importing torch or loading and partitioning the data."""
    import subprocess
    import sys

    probe = "import sys, clients.app; print(sorted({'torch', 'sklearn', 'datasets'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    config = CONFIG.replace(dataset="mnist", model="mnist-2nn")
    task = node_task(request(config), context(**{"partition-id": 0, "num-partitions": 4, "data-dir": "/no/such/dir"}))
    assert task.partition_id == 0  # the data is read only when a handler asks for it
    with pytest.raises(DataError, match="/no/such/dir"):
        task.split


def test_a_node_refuses_a_privacy_mode_its_operator_did_not_accept():
    """Issue 22 (the node's own policy): failed before: a node took its privacy mode from the
    config the server sends, so a server could ask for privacy=plain and get updates in clear."""
    pinned = {"partition-id": 0, "num-partitions": 4, "accept-privacy": "secagg, he-threshold"}
    with pytest.raises(ConfigError, match="asked for privacy=plain, but this node accepts only secagg, he-threshold"):
        train_handler(request(CONFIG), context(**pinned))
    assert node_task(request(CONFIG.replace(privacy="secagg")), context(**pinned)).floors.accept_privacy == ("secagg", "he-threshold")
    with pytest.raises(ConfigError, match="accept-privacy names secret; the modes are"):
        node_task(request(CONFIG), context(**{**pinned, "accept-privacy": "secret"}))
    with pytest.raises(ConfigError, match="secagg-min-threshold='many'"):
        node_task(request(CONFIG), context(**{**pinned, "secagg-min-threshold": "many"}))


def test_a_node_holding_the_policy_runs_only_a_config_an_enrolled_operator_signed(tmp_path):
    """Issue 22 (the node's own policy, run signature): failed before: a node ran whatever config
    the server sent. With access-policy in its node config it checks the operator's signature
    over the config first: a server that changes any key (here the privacy mode) is refused."""
    from crypto import signing
    from fedlearn.access import AccessPolicy, sign_run

    operator = signing.generate()
    policy = AccessPolicy()
    policy.enroll("alice", operator.public_key(), operator=True)
    policy.save(tmp_path / "policy.toml")
    config = CONFIG.replace(access_policy=str(tmp_path / "server-side-policy.toml"))
    signed = config.replace(run_signature=sign_run(config, policy, operator))
    node = {"partition-id": 0, "num-partitions": 4, "access-policy": str(tmp_path / "policy.toml")}
    assert node_task(request(signed), context(**node)).config.privacy == "plain"  # as signed: runs
    for lie in (signed.replace(privacy="secagg"), config, signed.replace(run_signature=sign_run(config, policy, signing.generate()))):
        with pytest.raises(ConfigError, match="does not authorise the run config the server sent"):
            node_task(request(lie), context(**node))
