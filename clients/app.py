"""Flower ClientApp: receive the global model and run config, train locally, reply.

Which data a node trains on comes from its node config (``partition-id``,
``num-partitions``; Flower's simulation sets them, a SuperNode gets them from
``--node-config``). A node may also override ``data-dir`` and ``device`` there, since those
are facts about the node's machine, not about the run.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlearn import data, models
from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError
from fedlearn.training import check_finite, client_seed, evaluate, select_device, train

NODE_OVERRIDES = ("data-dir", "device")

app = ClientApp()


def _node_setup(msg: Message, context: Context) -> tuple[RunConfig, int, int, int]:
    sent = dict(msg.content["config"])
    server_round = int(sent.get("server-round", 0))
    node = context.node_config
    sent.update({k: node[k] for k in NODE_OVERRIDES if k in node})
    config = RunConfig.from_flat(sent)
    if "partition-id" not in node:
        raise ConfigError(
            ["this node has no partition-id: start it with --node-config 'partition-id=I num-partitions=N'"]
        )
    partition_id = int(node["partition-id"])
    num_partitions = int(node.get("num-partitions", config.num_clients))
    return config, server_round, partition_id, num_partitions


def _local_model(msg: Message, config: RunConfig):
    spec = data.spec(config.dataset)
    model = models.build(config.model, spec.shape, spec.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    config, server_round, partition_id, num_partitions = _node_setup(msg, context)
    split = data.client_split(config, partition_id, num_partitions)
    model = _local_model(msg, config)
    result = train(model, split, config, server_round, seed=client_seed(config.seed, server_round, partition_id))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    check_finite(state)
    metrics = MetricRecord(
        {"num-examples": result.num_examples, "loss": result.loss, "accuracy": result.accuracy}
    )
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (for seed-stable client sampling)."""
    answer = ConfigRecord()
    if "partition-id" in context.node_config:
        answer["partition-id"] = int(context.node_config["partition-id"])
    return Message(RecordDict({"config": answer}), reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    config, _, partition_id, num_partitions = _node_setup(msg, context)
    split = data.client_split(config, partition_id, num_partitions)
    loss, accuracy = evaluate(_local_model(msg, config), split, select_device(config.device))
    metrics = MetricRecord({"num-examples": len(split), "loss": loss, "accuracy": accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
