"""A federated run's setup and teardown on the server, around Flower's round loop.

Setup (``start_run``) does everything that can fail on bad input before the run directory
exists, then creates (or reopens) the run store, the audited run and the strategy under its
privacy mode, and the grid every message goes through (partition order, injected faults,
access control, metering). Teardown (``finish_run``) saves the models and closes the audit
log. What happens after each round is server.recorder's.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import flwr
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from crypto.digest import arrays_digest
from fedlearn import data, families, models, privacy, strategies
from fedlearn.checkpoint import Checkpoint, CheckpointError
from fedlearn.config import RunConfig
from fedlearn.fedavg import FedAvgFamily
from fedlearn.messages import NODE_RECORD, PARTITION_KEY
from fedlearn.paths import writable_directory
from fedlearn.runs import RunStore
from fedlearn.strategies import MetricsAggregator
from fedlearn.training import select_device
from server.access import (
    AccessGrid,
    AuditedRun,
    load_credentials,
    load_run_audit_key,
    open_audited_run,
    reopen_audited_run,
)
from server.grid import (
    DropoutGrid,
    MeteredGrid,
    PartitionOrderedGrid,
    PromptGrid,
    short_reason,
)
from server.privacy import PrivacyStrategy, innermost, strategy_class
from server.resume import load_checkpoint, restore_strategy_state


def global_model(config: RunConfig) -> torch.nn.Module:
    """The run's model at its seeded initial weights."""
    return models.for_run(config)


def resumed_arrays(checkpoint: Checkpoint, initial: ArrayRecord) -> ArrayRecord:
    """The checkpoint's model in the order of the run's own arrays (a safetensors file gives
    its arrays back in another order, and order matters wherever arrays are flattened)."""
    model = checkpoint.model
    if set(model) != set(initial):
        raise CheckpointError(f"the checkpoint's model holds {sorted(model)}, this run's model {sorted(initial)}: "
                              "the checkpoint is not of this model; start a new run")
    return ArrayRecord({name: Array(model[name]) for name in initial})


def initial_arrays(config: RunConfig) -> ArrayRecord:
    return ArrayRecord(global_model(config).state_dict())


def numpy_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in arrays.items()}


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


@dataclass
class Run:
    """A run in progress: what the round loop, the recorder and teardown share."""

    config: RunConfig
    family: families.Family  # the strategy's traits
    halves: FedAvgFamily  # and its hooks
    store: RunStore
    audited: AuditedRun
    strategy: PrivacyStrategy  # the Flower strategy under the run's privacy mode
    grid: MeteredGrid  # partition order <- injected faults <- access control <- metering
    access: AccessGrid
    faulty: DropoutGrid | None
    initial: ArrayRecord  # the global state round 1 starts from
    model: torch.nn.Module  # evaluates each round's model when the server does
    test: data.Split | None  # the server's test split (None: clients evaluate)
    device: torch.device
    checkpoint: Checkpoint | None  # the one a resumed run continues from
    started: float
    warnings: dict[str, str] = field(default_factory=dict)  # kind -> the latest warning of that kind (for the summary)
    # Flower's node sampling draws from this generator only (server.grid.sampling_with), seeded
    # by the run: no other thread's use of `random` can change which nodes a round samples.
    sampling: random.Random = field(default_factory=random.Random)

    @property
    def audit(self):
        return self.audited.audit

    @property
    def offset(self) -> int:
        """Rounds done before this process started (a resumed run's checkpoint round)."""
        return self.checkpoint.round if self.checkpoint else 0

    def inner(self) -> Strategy:
        return innermost(self.strategy)


class ClientMetrics:
    """The clients' metrics of the round in progress, kept as Flower's strategies aggregate them."""

    def __init__(self):
        self.values: dict[str, float] = {}  # this round's client-side metrics, for the round record
        self.accuracy: dict[str, float] = {}  # this round's test accuracy of each client (by partition id)

    def aggregator(self, prefix: str) -> MetricsAggregator:
        def aggregate(replies: list[RecordDict], weight_key: str) -> MetricRecord:
            metrics = aggregate_metricrecords(replies, weight_key)
            self.values.update({f"{prefix}_{k}": float(v) for k, v in metrics.items() if k != weight_key})
            if prefix == "federated":  # personalised and distilled models differ per client: keep each one's
                for content in replies:
                    if NODE_RECORD in content and "accuracy" in content["metrics"]:
                        self.accuracy[str(content[NODE_RECORD][PARTITION_KEY])] = float(content["metrics"]["accuracy"])
            return metrics

        return aggregate

    def clear(self) -> None:
        self.values.clear()
        self.accuracy.clear()


def _connected_grid(grid: Grid, config: RunConfig) -> tuple[PartitionOrderedGrid, list[int]]:
    """The grid that orders nodes by partition, once enough nodes are connected."""
    ordered = PartitionOrderedGrid(PromptGrid(grid))
    subset = config.fraction_train < 1 or 0 < config.fraction_evaluate < 1 or config.dropout_rate > 0
    nodes = ordered.wait_for_nodes(config.min_available_clients, config.round_timeout,
                                   expected=config.num_clients if subset else 0)
    if subset:
        # Sampling a subset, or dropping some: make it pick the same partitions for the same seed.
        ordered.discover(nodes, config.round_timeout)
    return ordered, nodes


def start_run(grid: Grid, config: RunConfig, metrics: ClientMetrics, run_id: str | None = None) -> Run:
    """Everything before round 1. With ``resume-from`` set, continue that run directory from its
    checkpoint instead: its own config, model, strategy state, round number and audit chain."""
    checkpoint = None
    resume_dir = Path(config.resume_from).expanduser().resolve() if config.resume_from else None
    if resume_dir is not None:
        config, checkpoint = load_checkpoint(resume_dir)
    # Everything that can fail on bad input fails before the run directory exists.
    writable_directory(resume_dir or config.out_dir, "resume-from" if resume_dir else "out-dir")
    # The server needs the test split only when it evaluates (never under he).
    test = None if config.evaluates_on_clients() else data.test_split(config)
    device = select_device(config.device)
    policy, audit_key = load_credentials(config)
    if resume_dir is not None and audit_key is None:
        audit_key = load_run_audit_key(resume_dir)
    wrapper = strategy_class(config)
    wrapper.preflight(config)
    family = families.get(config.strategy)
    halves = family.halves()
    model = global_model(config)  # the initial weights; evaluates each round's model when the server does
    shared = halves.template(config)  # what is federated (fedper: no head; fedmd: a consensus)
    ordered, nodes = _connected_grid(grid, config)
    store = RunStore.reopen(resume_dir, config, checkpoint.round) if checkpoint else RunStore.create(config, run_id)
    provisioned = wrapper.provision(config, store.directory)
    if provisioned != config:
        config = provisioned
        store.update_config(config)
    initial = halves.initial_arrays(config, shared)
    facts = {"versions": software_versions(), "nodes_connected": len(nodes)}
    if checkpoint is None:
        audited = open_audited_run(config, store, policy, audit_key, {**facts, "initial_model": arrays_digest(numpy_arrays(initial))})
    else:
        initial = resumed_arrays(checkpoint, initial)
        audited = reopen_audited_run(config, store, policy, audit_key, checkpoint, facts)
    config = audited.config
    inner = strategies.build(config, train_metrics_aggr_fn=metrics.aggregator("train"),
                             evaluate_metrics_aggr_fn=metrics.aggregator("federated"))
    template = ArrayRecord(shared)  # the names, shapes and dtypes an update must have
    strategy = wrapper(inner, config, numpy_arrays(template))
    strategy.check_update = halves.update_check(config, innermost(strategy), template)
    if checkpoint is not None:
        restore_strategy_state(strategy, checkpoint.strategy, checkpoint.layout)
    faulty = None
    if config.dropout_rate > 0:
        stage = privacy.get(config.privacy).stages.get(config.dropout_stage, config.dropout_stage)
        faulty = DropoutGrid(ordered, config.dropout_rate, stage, config.seed, ordered.partitions)
    access = AccessGrid(faulty or ordered, audited.policy, audited.audit, store.run_id, model=template,
                        check_update=strategy.check_reply,
                        max_update_bytes=config.max_update_bytes(sum(t.numel() for t in shared.values())))
    return Run(config, family, halves, store, audited, strategy, MeteredGrid(access), access, faulty, initial, model, test, device,
               checkpoint, time.perf_counter())


def fail_run(run: Run, exc: BaseException) -> None:
    """The run stopped on an error: say so at the end of its audit log (the rounds so far stay)."""
    last_round = run.store.rounds[-1].round if run.store.rounds else 0
    run.audit.append("run_end", last_round, {"status": "failed", "reason": short_reason(str(exc))[:1000]})
    run.audit.close()


def finish_run(run: Run, final: ArrayRecord, stopped_early: bool) -> dict:
    """Save the models, end the audit log, write the summary; returns it."""
    config, store, audit = run.config, run.store, run.audit
    arrays = numpy_arrays(final)
    model_file = run.strategy.save_model(store, arrays)
    run.halves.finish(config, store, run.inner(), final, privacy.get(config.privacy).sees_aggregate)
    audit.append("run_end", store.rounds[-1].round, {
        "status": "stopped at target accuracy" if stopped_early else "completed",
        "final_model": arrays_digest(arrays),
        "model_file": model_file.name,
    })
    audit.close()
    extra = {
        "run_dir": str(store.directory),
        "stopped_at_target": stopped_early,
        "resumed_from_round": run.offset or None,
        "parameters": models.count_parameters(run.model),
        "operator": run.audited.operator.name,
        "audit_log": str(audit.path),
        "audit_key": audit.key_fingerprint,
        "audit_head": audit.head,
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "warnings": list(run.warnings.values()),
    }
    return store.finish(time.perf_counter() - run.started, extra)
