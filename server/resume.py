"""Continuing a run after the server process died: the strategy's state in and out of a
checkpoint, and Flower's round loop started at the round after the checkpoint.

Flower's strategies keep their cross-round state in a few attributes (FedAvgM's momentum,
FedOpt's moments and current model); those are the state a checkpoint must carry, so a resumed
fedadam takes the same step it would have taken without the crash.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from crypto import signing
from fedlearn import audit as audit_log
from fedlearn import families, privacy
from fedlearn.checkpoint import Checkpoint, CheckpointError
from fedlearn.config import RunConfig
from fedlearn.runs import load_run_config, recorded_rounds
from server.privacy import innermost

STATE_ATTRIBUTES = ("current_arrays", "momentum_vector", "m_t", "v_t")


def load_checkpoint(run_dir: Path) -> tuple[RunConfig, Checkpoint]:
    """The config and checkpoint of a run to resume, or a CheckpointError saying why not."""
    config = load_run_config(run_dir)
    if not privacy.get(config.privacy).server_class().checkpointable:
        raise CheckpointError(
            f"privacy={config.privacy} runs cannot be resumed: the server holds the global model and its momentum "
            "only as ciphertexts, which are not checkpointed; start a new run"
        )
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
    check_audited_digests(checkpoint, audit_log.read(log))
    if checkpoint.config_digest != config.digest():
        raise CheckpointError(f"{run_dir}/config.toml changed since the checkpoint was written; restore it to resume")
    why = families.get(config.strategy).not_resumable
    if why:
        raise CheckpointError(f"strategy={config.strategy} cannot be resumed: {why}")
    if checkpoint.round >= config.num_rounds:
        raise CheckpointError(f"{run_dir} already ran all {config.num_rounds} rounds: nothing to resume")
    recorded_rounds(run_dir, checkpoint.round)  # refuses a damaged history before anything starts
    return config, checkpoint


def check_audited_digests(checkpoint: Checkpoint, records: list[dict]) -> None:
    """The checkpoint's model and state must be those the audit log's ``round_end`` of its round
    names: a checkpoint edited after it was written (model, strategy state, random state) is
    refused, not resumed. (Runs older than these digests name none; their head check remains.)"""
    ends = [r for r in records[: checkpoint.audit_seq] if r.get("event") == "round_end" and r.get("round") == checkpoint.round]
    if not ends:
        raise CheckpointError(f"the audit log has no round_end for round {checkpoint.round}, the checkpoint's round: "
                              "they are from different runs or one was replaced")
    audited = ends[-1].get("data", {}).get("checkpoint")
    if audited is None:
        return
    for part, digest in checkpoint.digests().items():
        if audited.get(part) != digest:
            raise CheckpointError(
                f"checkpoint.safetensors was changed after round {checkpoint.round}: its {part} digest {digest[:16]} is not "
                f"the {str(audited.get(part))[:16]} the audit log recorded; keep it as evidence and start a new run"
            )


def strategy_state(strategy: Strategy) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays named ``<attribute>/<key>``, layout to rebuild them) of the strategy's state."""
    inner = innermost(strategy)
    arrays: dict[str, np.ndarray] = {}
    layout: dict = {}
    for attribute in STATE_ATTRIBUTES:
        value = getattr(inner, attribute, None)
        if value is None:
            continue
        if isinstance(value, ArrayRecord):
            kind, items = "arrayrecord", {k: a.numpy() for k, a in value.items()}
        elif isinstance(value, dict):
            kind, items = "dict", value
        elif isinstance(value, list):
            kind, items = "list", {str(i): v for i, v in enumerate(value)}
        else:
            raise TypeError(f"{type(inner).__name__}.{attribute} is a {type(value).__name__}: cannot checkpoint it")
        layout[attribute] = {"kind": kind, "keys": list(items)}
        arrays.update({f"{attribute}/{k}": np.asarray(v) for k, v in items.items()})
    return arrays, layout


def restore_strategy_state(strategy: Strategy, arrays: dict[str, np.ndarray], layout: dict) -> None:
    inner = innermost(strategy)
    for attribute, spec in layout.items():
        if attribute not in STATE_ATTRIBUTES:
            raise ValueError(f"checkpoint names strategy state {attribute!r}, which fedlearn does not restore")
        items = {k: arrays[f"{attribute}/{k}"] for k in spec["keys"]}
        if spec["kind"] == "arrayrecord":
            value = ArrayRecord({k: Array(v) for k, v in items.items()})
        elif spec["kind"] == "list":
            value = [items[k] for k in spec["keys"]]
        else:
            value = items
        setattr(inner, attribute, value)


class ResumedStrategy(Strategy):
    """Flower's ``Strategy.start`` always counts rounds from 1: this shifts them by ``offset``,
    so rounds ``offset+1 ..`` run through the same loop, messages and audit as a fresh run."""

    def __init__(self, inner: Strategy, offset: int):
        self.inner, self.offset = inner, offset

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)
