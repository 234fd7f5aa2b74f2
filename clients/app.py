"""Flower ClientApp: receive the global model and run config, train locally, reply.

Which data a node trains on comes from its node config (``partition-id``,
``num-partitions``; Flower's simulation sets them, a SuperNode gets them from
``--node-config``). A node may also override ``data-dir`` and ``device`` there, since those
are facts about the node's machine, not about the run. Every reply carries the node's
partition id, so the server can order replies (and sampling) independently of Flower's
random node IDs.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlearn import data, models
from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError
from fedlearn.messages import NODE_RECORD, PARTITION_KEY
from fedlearn.training import check_finite, client_seed, evaluate, select_device, train

NODE_OVERRIDES = ("data-dir", "device")

app = ClientApp()


@dataclass(frozen=True)
class NodeTask:
    config: RunConfig
    server_round: int
    partition_id: int
    split: data.Split


def partition_of(context: Context) -> int:
    if PARTITION_KEY not in context.node_config:
        raise ConfigError(
            ["this node has no partition-id: start it with --node-config 'partition-id=I num-partitions=N'"]
        )
    return int(context.node_config[PARTITION_KEY])


def node_task(msg: Message, context: Context) -> NodeTask:
    sent = dict(msg.content["config"])
    node = context.node_config
    sent.update({k: node[k] for k in NODE_OVERRIDES if k in node})
    config = RunConfig.from_flat(sent)
    partition_id = partition_of(context)
    num_partitions = int(node.get("num-partitions", config.num_clients))
    if num_partitions != config.num_clients:
        raise ConfigError(
            [
                f"this node splits the data into num-partitions={num_partitions}, but the run has "
                f"num-clients={config.num_clients}: start {config.num_clients} nodes (for `flwr run`, "
                f"--federation-config 'num-supernodes={config.num_clients}') or set num-clients={num_partitions}"
            ]
        )
    split = data.client_split(config, partition_id, num_partitions)
    return NodeTask(config, int(sent.get("server-round", 0)), partition_id, split)


def reply(msg: Message, partition_id: int, **records) -> Message:
    node = ConfigRecord({PARTITION_KEY: partition_id})
    return Message(RecordDict({**records, NODE_RECORD: node}), reply_to=msg)


def received_model(msg: Message, config: RunConfig):
    spec = data.spec(config.dataset)
    model = models.build(config.model, spec.shape, spec.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    task = node_task(msg, context)
    model = received_model(msg, task.config)
    seed = client_seed(task.config.seed, task.server_round, task.partition_id)
    result = train(model, task.split, task.config, task.server_round, seed=seed)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    check_finite(state)
    metrics = MetricRecord({"num-examples": result.num_examples, "loss": result.loss, "accuracy": result.accuracy})
    return reply(msg, task.partition_id, arrays=ArrayRecord(state), metrics=metrics)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this node's own (training) partition."""
    task = node_task(msg, context)
    loss, accuracy = evaluate(received_model(msg, task.config), task.split, select_device(task.config.device))
    metrics = MetricRecord({"num-examples": len(task.split), "loss": loss, "accuracy": accuracy})
    return reply(msg, task.partition_id, metrics=metrics)


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (for seed-stable client sampling)."""
    return reply(msg, partition_of(context))
