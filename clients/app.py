"""Flower ClientApp: receive the global model and run config, train locally, reply.

Which data a node trains on comes from its node config (``partition-id``,
``num-partitions``; Flower's simulation sets them, a SuperNode gets them from
``--node-config``). A node may also override ``data-dir`` and ``device`` there, since those
are facts about the node's machine, not about the run. Every reply carries the node's
partition id, so the server can order replies (and sampling) independently of Flower's
random node IDs.

When a request carries the server's challenge (the ``auth`` record), the reply is signed with
the node's Ed25519 key: ``node-key`` in the node config (a deployed SuperNode), else
``<node-keys-dir>/node-<partition-id>.key`` (simulation, where the server provisions keys).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import ddp
from clients.privacy import ClientHalf
from crypto import signing
from fedlearn import data, distillation, ifca, models, multimodel, privacy
from fedlearn.access import NODE_KEY_NAME, update_statement
from fedlearn.config import CLUSTERED_STRATEGIES, DISTILLATION_STRATEGIES, MULTIMODEL_STRATEGIES, RunConfig
from fedlearn.errors import ConfigError
from fedlearn.messages import AUTH_RECORD, NODE_RECORD, NUM_EXAMPLES_KEY, PARTITION_KEY, PERSONAL_RECORD, payload_digest
from fedlearn.training import TrainResult, check_finite, client_seed, evaluate, select_device, train

NODE_OVERRIDES = ("data-dir", "device", "he-secret", "amp", "compile", "ddp-world-size")  # the node's own hardware and files


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


def key_path(context: Context, config: RunConfig, partition_id: int) -> Path:
    if "node-key" in context.node_config:
        return Path(str(context.node_config["node-key"])).expanduser()
    if config.node_keys_dir:
        return Path(config.node_keys_dir) / f"{NODE_KEY_NAME.format(partition_id)}.key"
    raise ConfigError(
        [
            "this node has no signing key: create one with `fedlearn keys generate --out keys --name NAME`, "
            "have the operator enroll keys/NAME.pub (`fedlearn keys enroll`), and start the node with "
            "--node-config 'node-key=keys/NAME.key partition-id=I num-partitions=N'"
        ]
    )


@lru_cache(maxsize=64)
def _load_key(path: Path):
    try:
        return signing.load_private(path)
    except signing.KeyFileError as exc:
        raise ConfigError([f"node-key: {exc}"]) from None


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


def signing_key(msg: Message, context: Context, task: NodeTask):
    """The node's key when the server sent a challenge to sign, else None."""
    if AUTH_RECORD not in msg.content:
        return None
    return _load_key(key_path(context, task.config, task.partition_id))


def reply(msg: Message, partition_id: int, key=None, **records) -> Message:
    """The reply to ``msg``: ``records`` plus the node record, signed with ``key`` if given."""
    content = RecordDict({NODE_RECORD: ConfigRecord({PARTITION_KEY: partition_id}), **records})
    if key is not None:
        content = signed(msg, content, key)
    return Message(content, reply_to=msg)


def client_half(config: RunConfig) -> ClientHalf:
    """The run's privacy mode's client half (fedlearn.privacy is the one place that maps the name)."""
    return privacy.get(config.privacy).client_half()


@dataclass
class GlobalModel:
    model: object  # the torch module loaded with the global weights
    arrays: dict  # the same weights as numpy arrays
    decoded: object = None  # what the privacy mode kept of decoding them (he: its codec, the model before)


def personal_layers(model: torch.nn.Module, config: RunConfig, state: RecordDict) -> dict[str, torch.Tensor]:
    """fedper: this node's own last layers, kept in its Flower context between rounds (the seeded
    initial ones before its first round); empty for every other strategy."""
    names = models.personal_names(config, model)
    if not names:
        return {}
    if PERSONAL_RECORD in state:
        return state[PERSONAL_RECORD].to_torch_state_dict()
    initial = models.for_run(config).state_dict()
    return {name: initial[name] for name in names}


def keep_personal_layers(model: torch.nn.Module, config: RunConfig, state: RecordDict) -> None:
    names = models.personal_names(config, model)
    if names:
        state[PERSONAL_RECORD] = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items() if k in names})


def received_model(msg: Message, config: RunConfig, node_state: RecordDict) -> GlobalModel:
    """The model to train or test: the global model of ``msg`` (clear arrays, or under privacy=he
    the decrypted aggregate) with this node's personal layers (fedper) from ``node_state``. Under
    fedmd and multimodel there is no single model (None): see ``arrays``."""
    # fedmd's global state is a consensus, multimodel's several models: no one model to load
    single = config.strategy not in DISTILLATION_STRATEGIES + MULTIMODEL_STRATEGIES
    model = models.for_run(config, seeded=False) if single else None
    if model is not None:
        model.load_state_dict(personal_layers(model, config, node_state), strict=False)
    arrays, decoded = client_half(config).decode(msg, config)
    if model is not None:
        models.load_shared(model, config, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return GlobalModel(model, arrays, decoded)


def private_model(task: NodeTask, state: RecordDict) -> torch.nn.Module:
    """fedmd: this node's own model, as its last round left it (its seeded start before that)."""
    model = distillation.private_model(task.config, task.partition_id)
    if distillation.PRIVATE_MODEL in state:
        model.load_state_dict(state[distillation.PRIVATE_MODEL].to_torch_state_dict())
    return model


def chosen_cluster(msg: Message, task: NodeTask) -> tuple[torch.nn.Module, ConfigRecord]:
    """ifca: the cluster model with the lowest loss on this node's training data, and the
    record that tells the server which one it is."""
    modules = ifca.load_cluster_models(msg.content["arrays"], task.config)
    cluster, losses = ifca.choose_cluster(modules, task.split, select_device(task.config.device))
    return modules[cluster], ifca.cluster_record(cluster, losses)


def trained(model: torch.nn.Module, task: NodeTask, seed: int) -> TrainResult:
    """Train ``model`` on this node's data (in ddp-world-size processes when > 1); refuse NaN/Inf
    weights (diverged) before they are sent."""
    fit = ddp.train_data_parallel if task.config.ddp_world_size > 1 else train
    result = fit(model, task.split, task.config, task.server_round, seed=seed)
    check_finite(model.state_dict())
    return result


def fedmd_round(task: NodeTask, consensus: np.ndarray, node_state: RecordDict, seed: int) -> tuple[dict, TrainResult]:
    """fedmd: digest the consensus (from round 2 on), revisit the private data, describe the public set."""
    config, model = task.config, private_model(task, node_state)
    public = data.public_split(config).x
    if task.server_round > 1 and config.distill_epochs:
        distillation.digest(model, public, consensus, config, seed=seed)
    result = trained(model, task, seed)
    node_state[distillation.PRIVATE_MODEL] = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})
    probabilities = distillation.soft_labels(model, public, select_device(config.device))
    return {distillation.SOFT_LABELS: torch.from_numpy(probabilities)}, result


def local_update(msg: Message, context: Context, task: NodeTask, seed: int):
    """This round's work on the node, by strategy: (what it sends before any privacy encoding,
    its training result, the global state it received, extra reply records)."""
    config = task.config
    if config.strategy in CLUSTERED_STRATEGIES:
        model, record = chosen_cluster(msg, task)
        result = trained(model, task, seed)
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, result, None, {ifca.IFCA_RECORD: record}
    received = received_model(msg, config, context.state)
    if config.strategy in MULTIMODEL_STRATEGIES:
        return (*multimodel.train_models(config, received.arrays, task.split, task.partition_id, task.server_round, seed), received, {})
    if config.strategy in DISTILLATION_STRATEGIES:
        return (*fedmd_round(task, received.arrays[distillation.SOFT_LABELS], context.state, seed), received, {})
    result = trained(received.model, task, seed)
    keep_personal_layers(received.model, config, context.state)
    return {k: v.detach().cpu() for k, v in models.shared_state(config, received.model).items()}, result, received, {}


def train_handler(msg: Message, context: Context) -> Message:
    task = node_task(msg, context)
    key = signing_key(msg, context, task)  # a missing key fails before training, not after
    seed = client_seed(task.config.seed, task.server_round, task.partition_id)
    state, result, received, extra = local_update(msg, context, task, seed)
    if task.config.is_slow(task.partition_id):  # a simulated straggler (slow-fraction, slow-seconds)
        time.sleep(task.config.slow_seconds)
    metrics = MetricRecord({"num-examples": result.num_examples, "loss": result.loss, "accuracy": result.accuracy})
    records = client_half(task.config).encode(msg, context, task, received, state, result.num_examples)
    return reply(msg, task.partition_id, key, metrics=metrics, **records, **extra)


def stage_handler(msg: Message, context: Context) -> Message:
    """A privacy mode's own stage (secagg's key stages, he-threshold's key holders), answered by
    the mode's client half and signed."""
    task = node_task(msg, context)
    answer = client_half(task.config).stages[msg.metadata.message_type]
    return reply(msg, task.partition_id, signing_key(msg, context, task), **answer(msg, context, task))


def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this node's share of the test split."""
    task = node_task(msg, context)
    if task.config.strategy in DISTILLATION_STRATEGIES and not task.config.local_test_fraction:
        test = data.test_split(task.config)  # every client owns a different model: test each on all of it
    else:
        test = data.client_test_split(task.config, task.partition_id, task.config.num_clients)
    if task.config.strategy in MULTIMODEL_STRATEGIES:
        metrics = MetricRecord(multimodel.evaluate_models(task.config, received_model(msg, task.config, context.state).arrays, test))
        return reply(msg, task.partition_id, signing_key(msg, context, task), metrics=metrics)
    if task.config.strategy in CLUSTERED_STRATEGIES:
        model = chosen_cluster(msg, task)[0]  # chosen on training data, as in training: never on the test split
    elif task.config.strategy in DISTILLATION_STRATEGIES:
        model = private_model(task, context.state)  # the node's own model; the consensus says nothing to test
    else:
        model = received_model(msg, task.config, context.state).model
    loss, accuracy = evaluate(model, test, select_device(task.config.device))
    metrics = MetricRecord({"num-examples": len(test), "loss": loss, "accuracy": accuracy})
    return reply(msg, task.partition_id, signing_key(msg, context, task), metrics=metrics)


def query_handler(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (for seed-stable client sampling) and, when
    asked (privacy=he), how many training examples: both also travel in clear in every reply."""
    if "config" in msg.content and msg.content["config"].get("ask") == NUM_EXAMPLES_KEY:
        task = node_task(msg, context)
        return reply(msg, task.partition_id, **{NODE_RECORD: ConfigRecord({PARTITION_KEY: task.partition_id, NUM_EXAMPLES_KEY: len(task.split)})})
    return reply(msg, partition_of(context))


def make_client_app() -> ClientApp:
    """fedlearn's ClientApp, with a handler for the own stages of every registered privacy mode.

    Ray ships the app to its workers by value and the handlers by reference (module-level
    functions); the registry's modes travel with the app (``modes``), so a mode registered
    outside fedlearn (a test's) is imported, and so registered, in the workers too."""
    app = ClientApp()
    app.train()(train_handler)
    app.evaluate()(evaluate_handler)
    app.query()(query_handler)
    for mode in privacy.modes():
        for message_type in mode.client_half().stages:
            category, _, action = message_type.partition(".")
            getattr(app, category)(action)(stage_handler)
    app.modes = privacy.modes()
    return app


# The App that `flwr run .` and `fedlearn simulate` load (see [tool.flwr.app.components] in pyproject.toml).
app = make_client_app()
