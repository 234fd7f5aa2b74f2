"""Flower ServerApp: composes a strategy, centralized evaluation, access control, the audit log
and the run store.

The server is the authority on configuration: it validates the run config once and sends
the resolved keys to every client in each round's ConfigRecord, so clients behave the same
under ``flwr run``, ``fedlearn simulate`` and a real deployment.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from logging import INFO

import flwr
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from crypto import signing
from crypto.digest import arrays_digest
from fedlearn import data, ifca, models, multimodel, packing, strategies
from fedlearn.config import (
    ASYNCHRONOUS_STRATEGIES,
    CLUSTERED_STRATEGIES,
    DISTILLATION_STRATEGIES,
    MULTIMODEL_STRATEGIES,
    PERSONAL_STRATEGIES,
    RunConfig,
)
from fedlearn.errors import RoundFailed
from fedlearn.checkpoint import Checkpoint, CheckpointError
from fedlearn.runs import RoundRecord, RunStore, load_run_config
from fedlearn.training import evaluate, select_device
from fedlearn import audit as audit_log
from fedlearn.audit import AuditLog
from server.access import (
    AccessGrid,
    check_models_update,
    check_plain_update,
    RoundAccess,
    load_credentials,
    load_run_audit_key,
    open_audited_run,
    reopen_audited_run,
)
from fedlearn.messages import NODE_RECORD, PARTITION_KEY
from fedlearn.secagg import STAGE_MESSAGE_TYPES
from fedlearn.threshold import DECRYPT
from server.grid import DropoutGrid, MeteredGrid, PartitionOrderedGrid, short_reason
from server.he import HEStrategy, load_public_key, provision_he
from server.resume import ResumedStrategy, innermost, restore_strategy_state, strategy_state
from server.secagg import SecAggStrategy
from server.threshold import ThresholdStrategy, require_openfhe

RoundCallback = Callable[[RoundRecord], None]


class _TargetReached(Exception):
    """Raised from the per-round hook to end a run early once target-accuracy is met."""


def log_round(record: RoundRecord) -> None:
    log(
        INFO,
        "fedlearn round %d: accuracy=%.4f loss=%.4f %.2fs up=%dB down=%dB clients=%d failures=%d",
        record.round,
        record.accuracy,
        record.loss,
        record.seconds,
        record.bytes_up,
        record.bytes_down,
        record.clients,
        record.failures,
    )


def global_model(config: RunConfig) -> torch.nn.Module:
    """The run's model at its seeded initial weights."""
    return models.for_run(config)


def initial_arrays(config: RunConfig) -> ArrayRecord:
    return ArrayRecord(global_model(config).state_dict())


def software_versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__}
    for package in ("fedlearn", "numpy", "cryptography"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def numpy_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in arrays.items()}


def audit_round(audit: AuditLog, server_round: int, arrays: ArrayRecord, seen: RoundAccess, results: dict) -> None:
    """The round's closing records: what was aggregated from whom, then the results."""
    audit.append("aggregate", server_round, {
        "digest": arrays_digest(numpy_arrays(arrays)),
        "updates": seen.accepted,
        "examples": seen.examples,
        "update_digests": seen.update_digests,
    }, sync=False)
    audit.append("round_end", server_round, results)


def load_checkpoint(run_dir: Path) -> tuple[RunConfig, Checkpoint]:
    """The config and checkpoint of a run to resume, or a CheckpointError saying why not."""
    config = load_run_config(run_dir)
    checkpoint = Checkpoint.load(run_dir)
    log = run_dir / "audit.jsonl"
    if not log.is_file():
        raise CheckpointError(f"{log} not found: a resumed run continues its audit log, and this run has none")
    verdict = audit_log.verify(log, signing.load_public(run_dir / "audit.pub"), allow_incomplete=True)
    if not verdict.ok:
        raise CheckpointError(
            f"{run_dir}/audit.jsonl does not verify ({verdict.summary()}): resume refused so nothing is appended "
            "to a damaged log; keep it as evidence and start a new run"
        )
    if checkpoint.config_digest != config.digest():
        raise CheckpointError(f"{run_dir}/config.toml changed since the checkpoint was written; restore it to resume")
    if config.strategy in PERSONAL_STRATEGIES + DISTILLATION_STRATEGIES:
        raise CheckpointError(
            f"strategy={config.strategy} cannot be resumed: part of what it trains lives on the clients (in their "
            "Flower context), not in the server's checkpoint, and a resumed run would restart it from scratch; "
            "start a new run"
        )
    if config.strategy in ASYNCHRONOUS_STRATEGIES:
        raise CheckpointError(
            f"strategy={config.strategy} cannot be resumed: the updates in flight and in its buffer are not in the "
            "checkpoint; start a new run"
        )
    if checkpoint.round >= config.num_rounds:
        raise CheckpointError(f"{run_dir} already ran all {config.num_rounds} rounds: nothing to resume")
    return config, checkpoint


def run_federation(
    grid: Grid, config: RunConfig, on_round: RoundCallback = log_round, run_id: str | None = None
) -> dict:
    """Run every round of ``config`` on ``grid`` and write the run directory. Returns the summary.

    With ``resume-from`` set, continue that run directory from its checkpoint instead: its own
    config, model, strategy state, round number, random state and audit chain."""
    checkpoint = None
    resume_dir = Path(config.resume_from).expanduser().resolve() if config.resume_from else None
    if resume_dir is not None:
        config, checkpoint = load_checkpoint(resume_dir)
    # Everything that can fail on bad input fails before the run directory exists.
    # The server needs the test split only when it evaluates (never under he).
    test = None if config.evaluates_on_clients() else data.test_split(config)
    device = select_device(config.device)
    policy, audit_key = load_credentials(config)
    if resume_dir is not None and audit_key is None:
        audit_key = load_run_audit_key(resume_dir)
    he_key = load_public_key(config)
    require_openfhe(config)
    model = global_model(config)  # the initial weights; evaluates each round's model when the server does
    shared = strategies.initial_state(config)  # what is federated (fedper: no head; fedmd: a consensus)
    ordered = PartitionOrderedGrid(grid)
    subset = config.fraction_train < 1 or 0 < config.fraction_evaluate < 1 or config.dropout_rate > 0
    nodes = ordered.wait_for_nodes(config.min_available_clients, config.round_timeout,
                                   expected=config.num_clients if subset else 0)
    if subset:
        # Sampling a subset, or dropping some: make it pick the same partitions for the same seed.
        ordered.discover(nodes, config.round_timeout)
    if checkpoint is not None:
        store = RunStore.reopen(resume_dir, config, checkpoint.round)
    else:
        store = RunStore.create(config, run_id)
    if config.privacy == "he" and he_key is None:
        config = provision_he(store.directory, config)
        store.update_config(config)
        he_key = load_public_key(config)  # the server reads back the public context only
    clustered = config.strategy in CLUSTERED_STRATEGIES
    several = config.strategy in MULTIMODEL_STRATEGIES  # named models, each evaluated and saved on its own
    initial = ifca.initial_arrays(config) if clustered else ArrayRecord(shared)
    client_metrics: dict[str, float] = {}  # this round's client-side metrics, for the round record
    client_accuracy: dict[str, float] = {}  # this round's test accuracy of each client (by partition id)
    facts = {"versions": software_versions(), "nodes_connected": len(nodes)}
    if checkpoint is None:
        run = open_audited_run(config, store, policy, audit_key, {**facts, "initial_model": arrays_digest(numpy_arrays(initial))})
    else:
        initial = ArrayRecord({name: Array(value) for name, value in checkpoint.model.items()})
        run = reopen_audited_run(config, store, policy, audit_key, checkpoint, facts)
    config, audit = run.config, run.audit

    def capture(prefix: str) -> strategies.MetricsAggregator:
        def aggregate(replies: list[RecordDict], weight_key: str) -> MetricRecord:
            metrics = aggregate_metricrecords(replies, weight_key)
            client_metrics.update({f"{prefix}_{k}": float(v) for k, v in metrics.items() if k != weight_key})
            if prefix == "federated":  # personalised and distilled models differ per client: keep each one's
                for content in replies:
                    if NODE_RECORD in content and "accuracy" in content["metrics"]:
                        client_accuracy[str(content[NODE_RECORD][PARTITION_KEY])] = float(content["metrics"]["accuracy"])
            return metrics

        return aggregate

    strategy = strategies.build(
        config, train_metrics_aggr_fn=capture("train"), evaluate_metrics_aggr_fn=capture("federated")
    )
    if he_key is not None:
        strategy = HEStrategy(strategy, config, he_key, numpy_arrays(ArrayRecord(shared)))
    elif config.privacy == "secagg":
        strategy = SecAggStrategy(strategy, config, numpy_arrays(ArrayRecord(shared)))
    elif config.privacy == "he-threshold":
        strategy = ThresholdStrategy(strategy, config, numpy_arrays(ArrayRecord(shared)))
    if checkpoint is not None:
        restore_strategy_state(strategy, checkpoint.strategy, checkpoint.layout)
    check = None if clustered else getattr(strategy, "check_reply", None)  # privacy modes' updates are not plain arrays
    template = ArrayRecord(shared)  # the names, shapes and dtypes an update must have
    if clustered:  # a plain update of one cluster model, and a valid cluster number
        def check(content):
            check_plain_update(content, template)
            strategy.check_reply(content)
    elif several and config.privacy == "plain":  # whole models of the run, the ones the client trained
        def check(content):
            check_models_update(content, template)
    faulty = None
    if config.dropout_rate > 0:
        stage = {**STAGE_MESSAGE_TYPES, "decrypt": DECRYPT}[config.dropout_stage]
        faulty = DropoutGrid(ordered, config.dropout_rate, stage, config.seed, ordered.partitions)
    access = AccessGrid(faulty or ordered, run.policy, audit, store.run_id, model=template, check_update=check,
                        max_update_bytes=config.max_update_bytes(sum(t.numel() for t in shared.values())))
    metered = MeteredGrid(access)

    state = {"arrays": initial, "clock": time.perf_counter(), "audit_seconds": 0.0}
    started = state["clock"]

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        state["arrays"] = arrays
        per_model: dict[str, float] = {}  # multimodel: each model's accuracy; the run's is their mean
        if not config.evaluates_on_clients() and several:
            metrics = multimodel.evaluate_models(config, arrays, test)
            loss, accuracy = metrics["loss"], metrics["accuracy"]
            per_model = {name: metrics[f"accuracy-{name}"] for name in config.model_names()}
        elif not config.evaluates_on_clients():
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, accuracy = evaluate(model, test, device)
        elif server_round == 0:
            return None  # clients evaluate after each round; the initial model is not sent to them
        else:
            loss = client_metrics.get("federated_loss", float("nan"))
            accuracy = client_metrics.get("federated_accuracy", float("nan"))
            per_model = {name: client_metrics[f"federated_accuracy-{name}"] for name in config.model_names()
                         if several and f"federated_accuracy-{name}" in client_metrics}
        now = time.perf_counter()
        traffic = metered.take_traffic()
        seen = access.take_round()
        exchange_audit = audit.seconds - state["audit_seconds"]  # appends while replies came in
        audit_started = time.perf_counter()
        clusters = cluster_facts(server_round)
        if server_round:
            audit_round(audit, server_round, arrays, seen, {
                "accuracy": accuracy, "loss": loss, "clients": traffic.replies, "failures": traffic.failures,
                "rejected": seen.rejected, "client_metrics": dict(client_metrics), "privacy": privacy_facts(seen, server_round),
                **({"clusters": clusters} if clusters else {}),
                **({"model_accuracy": per_model} if per_model else {}),
                **({"trained": innermost(strategy).trained.get(server_round, {})} if several and hasattr(innermost(strategy), "trained") else {}),
                **({"staleness": innermost(strategy).staleness.get(server_round, [])} if config.strategy in ASYNCHRONOUS_STRATEGIES else {}),
            })
        state["audit_seconds"] = audit.seconds
        timings = {
            "verify_seconds": seen.verify_seconds,
            "sign_seconds": seen.sign_seconds,
            "audit_seconds": exchange_audit + time.perf_counter() - audit_started,
        }
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            seconds=round(now - state["clock"], 4),
            bytes_up=traffic.bytes_up,
            bytes_down=traffic.bytes_down,
            clients=traffic.replies,
            failures=traffic.failures,
            rejected=seen.rejected,
            extra={**client_metrics, **{k: round(v, 6) for k, v in timings.items()},
                   **({"cluster_agreement": clusters["agreement"]} if clusters and truth else {}),
                   **({"client_accuracy": dict(sorted(client_accuracy.items(), key=lambda kv: int(kv[0])))} if client_accuracy else {}),
                   **({"model_accuracy": per_model} if per_model else {})},
        )
        client_metrics.clear()
        client_accuracy.clear()
        state["clock"] = now
        store.add_round(record)
        on_round(record)
        # (fedbuff's server updates come from its buffer, which may hold updates pulled before)
        if server_round and traffic.replies == 0 and config.strategy not in ASYNCHRONOUS_STRATEGIES:
            first = (
                short_reason(traffic.errors[0])
                if traffic.errors
                else f"no reply within round-timeout={config.round_timeout:g}s"
            )
            raise RoundFailed(
                f"round {server_round}: no client update to aggregate ({traffic.failures} clients failed; "
                f"first error: {first}). The run stopped rather than continue with an unchanged model; "
                f"the rounds so far are in {store.directory}"
            )
        if server_round and not isinstance(strategy, HEStrategy):
            save_checkpoint(server_round, arrays)
        if server_round and config.target_accuracy and accuracy >= config.target_accuracy:
            raise _TargetReached
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    def save_checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        state_arrays, layout = strategy_state(strategy)
        Checkpoint(
            round=server_round, model=numpy_arrays(arrays), strategy=state_arrays, layout=layout,
            config_digest=config.digest(), audit_seq=audit.seq, audit_head=audit.head, python_random=random.getstate(),
        ).save(store.directory)

    truth = {p: data.rotation_group(config, p) for p in range(config.num_clients)} if config.dataset == "rotated-digits" else None

    def cluster_facts(server_round: int) -> dict | None:
        """ifca: the cluster each client trained this round, and how well that recovers the true groups."""
        if not clustered or server_round not in innermost(strategy).membership:
            return None
        membership = innermost(strategy).membership[server_round]
        facts = {"membership": {str(c): k for c, k in membership.items()}}
        restarted = innermost(strategy).reseeded.get(server_round)
        if restarted:
            facts["restarted"] = {str(j): p for j, p in restarted.items()}  # cluster -> client whose model restarted it
        if truth:
            facts["agreement"] = ifca.agreement(membership, truth)
        return facts

    def privacy_facts(seen: RoundAccess, server_round: int) -> dict:
        facts = {"mode": config.privacy}
        if isinstance(strategy, (HEStrategy, SecAggStrategy, ThresholdStrategy)):
            facts = {**strategy.last, "update_digests": seen.update_digests}
        if faulty is not None:
            facts["injected_dropouts"] = len(faulty.dropped.get(server_round, []))
        return facts

    stopped_early = False
    offset = checkpoint.round if checkpoint else 0

    def resumed_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        return after_round(server_round + offset, arrays) if server_round else None  # round `offset` is done

    strategy_runner = ResumedStrategy(strategy, offset) if offset else strategy
    # Flower samples nodes with the global `random` module: seed it last, right before the
    # rounds, so nothing else (key generation, file writes, other threads) runs in between.
    if checkpoint is not None:
        checkpoint.restore_random()
    else:
        random.seed(config.seed)
    try:
        if isinstance(strategy, ThresholdStrategy):  # before any round: the key every update is encrypted under
            audit.append("key_ceremony", 0, strategy.hold_ceremony(metered).facts())
        strategy_runner.start(
            grid=metered,
            initial_arrays=initial,
            num_rounds=config.num_rounds - offset,
            timeout=config.round_timeout,
            train_config=ConfigRecord(config.to_flat()),
            evaluate_config=ConfigRecord(config.to_flat()),
            evaluate_fn=resumed_round if offset else after_round,
        )
    except _TargetReached:
        stopped_early = True
    except BaseException as exc:
        last_round = store.rounds[-1].round if store.rounds else 0
        audit.append("run_end", last_round, {"status": "failed", "reason": short_reason(str(exc))[:1000]})
        audit.close()
        raise
    final = numpy_arrays(state["arrays"])
    if clustered:
        ifca.write_membership(store.directory, innermost(strategy).membership, truth)
    if isinstance(strategy, HEStrategy):
        model_file = store.save_model(final, name="model.he.safetensors", metadata=strategy.state_metadata())
    else:
        model_file = store.save_model(final)
    if several and not isinstance(strategy, HEStrategy):  # and each model in a file of its own
        for name, arrays in packing.unpack(state["arrays"], config.model_names()).items():
            store.save_model(arrays, name=f"model-{name}.safetensors", metadata={"model": name})
    audit.append("run_end", store.rounds[-1].round, {
        "status": "stopped at target accuracy" if stopped_early else "completed",
        "final_model": arrays_digest(final),
        "model_file": model_file.name,
    })
    audit.close()
    extra = {
        "run_dir": str(store.directory),
        "stopped_at_target": stopped_early,
        "resumed_from_round": offset or None,
        "parameters": models.count_parameters(model),
        "operator": run.operator.name,
        "audit_log": str(audit.path),
        "audit_key": audit.key_fingerprint,
        "audit_head": audit.head,
        "torch": torch.__version__,
        "flwr": flwr.__version__,
    }
    return store.finish(time.perf_counter() - started, extra)


def make_server_app(
    config: RunConfig | None = None,
    on_round: RoundCallback = log_round,
    on_finish: Callable[[dict], None] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``config``; without one it reads Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        resolved = config or RunConfig.from_flat(context.run_config)
        summary = run_federation(grid, resolved, on_round)
        log(INFO, "fedlearn run finished: %s", summary["run_dir"])
        if on_finish:
            on_finish(summary)

    return app


# The App that `flwr run .` loads (see [tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
