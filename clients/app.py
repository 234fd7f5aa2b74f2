"""Flower ClientApp: receive the global model and run config, train locally, reply.

Which data a node trains on comes from its node config (``partition-id``,
``num-partitions``; Flower's simulation sets them, a SuperNode gets them from
``--node-config``). A node may also override ``data-dir`` and ``device`` there, since those
are facts about the node's machine, not about the run. Every reply carries the node's
partition id, so the server can order replies (and sampling) independently of Flower's
random node IDs.

When a request carries the server's challenge (the ``auth`` record), the reply is signed with
the node's Ed25519 key (clients.identity): ``node-key`` in the node config (a deployed SuperNode), else
``<node-keys-dir>/node-<partition-id>.key`` (simulation, where the server provisions keys).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.identity import check_run_signature, node_policy, signing_key
from clients.privacy import ClientHalf
from crypto import signing
from fedlearn import data, families, privacy
from fedlearn.access import update_statement
from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError
from fedlearn.families import ClientRound
from fedlearn.messages import AUTH_RECORD, NODE_RECORD, NUM_EXAMPLES_KEY, NUM_EXAMPLES_QUERY, PARTITION_KEY, payload_digest

if TYPE_CHECKING:
    import torch

    from fedlearn.training import TrainResult

NODE_OVERRIDES = ("data-dir", "device", "he-secret", "amp", "compile", "ddp-world-size")  # the node's own hardware and files


@dataclass(frozen=True)
class NodeFloors:
    """What the node's operator pinned in its node config, whatever the server sends:
    ``accept-privacy`` (the privacy modes it trains and answers under; default all) and
    ``secagg-min-threshold`` (the fewest shares that may unmask it; default the run's own rule)."""

    accept_privacy: tuple[str, ...] = ()
    secagg_min_threshold: int = 0

    @classmethod
    def of(cls, node_config) -> NodeFloors:
        accepted = tuple(str(node_config.get("accept-privacy", "")).replace(",", " ").split())
        unknown = [m for m in accepted if m not in privacy.names()]
        if unknown:
            raise ConfigError([f"node config accept-privacy names {', '.join(unknown)}; the modes are {', '.join(privacy.names())}"])
        try:
            threshold = int(node_config.get("secagg-min-threshold", 0))
        except (TypeError, ValueError):
            raise ConfigError([f"node config secagg-min-threshold={node_config.get('secagg-min-threshold')!r}: "
                               "give a whole number of shares"]) from None
        return cls(accepted, threshold)

    def check(self, config: RunConfig) -> None:
        if self.accept_privacy and config.privacy not in self.accept_privacy:
            raise ConfigError([f"the server asked for privacy={config.privacy}, but this node accepts only "
                               f"{', '.join(self.accept_privacy)} (its node config accept-privacy): refusing"])


@dataclass(frozen=True)
class NodeTask:
    config: RunConfig
    server_round: int
    partition_id: int
    num_partitions: int
    floors: NodeFloors = NodeFloors()

    @cached_property
    def split(self) -> data.Split:
        """This node's training examples, loaded when first asked for: Flower starts a process for
        every message, and the key stages of the privacy modes never need the data."""
        return data.client_split(self.config, self.partition_id, self.num_partitions)


def partition_of(context: Context) -> int:
    if PARTITION_KEY not in context.node_config:
        raise ConfigError(
            ["this node has no partition-id: start it with --node-config 'partition-id=I num-partitions=N'"]
        )
    return int(context.node_config[PARTITION_KEY])


def node_task(msg: Message, context: Context) -> NodeTask:
    sent = dict(msg.content["config"])
    node = context.node_config
    if "access-policy" in node:  # the node holds the policy: only a config an enrolled operator signed is run
        check_run_signature(RunConfig.from_flat(sent), node_policy(context, RunConfig()))
    sent.update({k: node[k] for k in NODE_OVERRIDES if k in node})
    config = RunConfig.from_flat(sent)
    floors = NodeFloors.of(node)
    floors.check(config)  # before anything is read, trained or answered
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
    return NodeTask(config, int(sent.get("server-round", 0)), partition_id, num_partitions, floors)


def signed(msg: Message, content: RecordDict, key) -> RecordDict:
    """Add the node's signature over the server's challenge and the digest of ``content``."""
    started = time.perf_counter()
    challenge = msg.content[AUTH_RECORD]
    run_id, server_round, nonce = str(challenge["run-id"]), int(challenge["round"]), str(challenge["nonce"])
    statement = update_statement(run_id, server_round, nonce, msg.metadata.message_type, payload_digest(content))
    content[AUTH_RECORD] = ConfigRecord(
        {
            "run-id": run_id,
            "round": server_round,
            "nonce": nonce,
            "key": signing.public_b64(key.public_key()),
            "sig": signing.sign(key, statement),
            "sign-seconds": time.perf_counter() - started,  # outside the signed digest; for benchmarks
        }
    )
    return content


def reply(msg: Message, partition_id: int, key=None, **records) -> Message:
    """The reply to ``msg``: ``records`` plus the node record, signed with ``key`` if given."""
    content = RecordDict({NODE_RECORD: ConfigRecord({PARTITION_KEY: partition_id}), **records})
    if key is not None:
        content = signed(msg, content, key)
    return Message(content, reply_to=msg)


def client_half(config: RunConfig) -> ClientHalf:
    """The run's privacy mode's client half (fedlearn.privacy is the one place that maps the name)."""
    return privacy.get(config.privacy).client_half()


def trained(model: torch.nn.Module, task: NodeTask, seed: int) -> TrainResult:
    """Train ``model`` on this node's data (in ddp-world-size processes when > 1); refuse NaN/Inf
    weights (diverged) before they are sent."""
    from clients import ddp
    from fedlearn.training import check_finite, train

    fit = ddp.train_data_parallel if task.config.ddp_world_size > 1 else train
    result = fit(model, task.split, task.config, task.server_round, seed=seed)
    check_finite(model.state_dict())
    return result


def local_round(msg: Message, context: Context, task: NodeTask) -> ClientRound:
    """This round's work on the node, for its strategy family; the global state is decoded by the
    privacy mode's client half when the family reads it."""
    from fedlearn.training import client_seed

    seed = client_seed(task.config.seed, task.server_round, task.partition_id)
    return ClientRound(task, context.state, seed, fit=trained, decode=lambda: client_half(task.config).decode(msg, task.config))


def train_handler(msg: Message, context: Context) -> Message:
    task = node_task(msg, context)
    key = signing_key(msg, context, task)  # a missing key fails before training, not after
    local = local_round(msg, context, task)
    update = families.halves(task.config.strategy).client_update(local)
    if task.config.is_slow(task.partition_id):  # a simulated straggler (slow-fraction, slow-seconds)
        time.sleep(task.config.slow_seconds)
    result = update.result
    metrics = MetricRecord({"num-examples": result.num_examples, "loss": result.loss, "accuracy": result.accuracy})
    records = client_half(task.config).encode(msg, context, task, local, update.state, result.num_examples)
    return reply(msg, task.partition_id, key, metrics=metrics, **records, **update.records)


def stage_handler(msg: Message, context: Context) -> Message:
    """A privacy mode's own stage (secagg's key stages, he-threshold's key holders), answered by
    the mode's client half and signed."""
    task = node_task(msg, context)
    answer = client_half(task.config).stages[msg.metadata.message_type]
    return reply(msg, task.partition_id, signing_key(msg, context, task), **answer(msg, context, task))


def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the global model (or what the strategy family tests instead) on this node's test data."""
    task = node_task(msg, context)
    metrics = families.halves(task.config.strategy).client_evaluate(local_round(msg, context, task))
    return reply(msg, task.partition_id, signing_key(msg, context, task), metrics=MetricRecord(metrics))


def query_handler(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (for seed-stable client sampling); it also
    travels in clear in every reply."""
    return reply(msg, partition_of(context))


def count_handler(msg: Message, context: Context) -> Message:
    """How many examples this node trains on (he, he-threshold size their weights by the largest),
    signed like an update: the server weights by it."""
    task = node_task(msg, context)
    node = ConfigRecord({PARTITION_KEY: task.partition_id, NUM_EXAMPLES_KEY: len(task.split)})
    return reply(msg, task.partition_id, signing_key(msg, context, task), **{NODE_RECORD: node})


def make_client_app(mods=()) -> ClientApp:
    """fedlearn's ClientApp, with a handler for the own stages of every registered privacy mode.

    Ray ships the app to its workers by value and the handlers by reference (module-level
    functions); the registries' modes and families travel with the app (``modes``,
    ``families``), so one registered outside fedlearn (a test's) is registered in the workers too."""
    app = ClientApp(mods=list(mods))  # mods: Flower client mods around every handler (tests play attackers with one)
    app.train()(train_handler)
    app.evaluate()(evaluate_handler)
    app.query()(query_handler)
    app.query(NUM_EXAMPLES_QUERY.partition(".")[2])(count_handler)
    for mode in privacy.modes():
        for message_type in mode.client_half().stages:
            category, _, action = message_type.partition(".")
            getattr(app, category)(action)(stage_handler)
    app.modes = privacy.modes()
    app.families = families.all_families()
    return app


# The App that `flwr run .` and `fedlearn simulate` load (see [tool.flwr.app.components] in pyproject.toml).
app = make_client_app()
