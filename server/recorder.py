"""What the server does after each round: evaluate, write the audit records and the round's
metrics, checkpoint, and decide whether the run goes on (Flower calls it as ``evaluate_fn``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from crypto.digest import arrays_digest
from fedlearn import data
from fedlearn.audit import AuditLog
from fedlearn.checkpoint import Checkpoint
from fedlearn.errors import RoundFailed
from fedlearn.runs import RoundRecord, client_drift
from server.access import RoundAccess
from server.grid import short_reason
from server.resume import strategy_state
from server.run import ClientMetrics, Run, numpy_arrays

RoundCallback = Callable[[RoundRecord], None]


class TargetReached(Exception):
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


def audit_round(audit: AuditLog, server_round: int, arrays: ArrayRecord, seen: RoundAccess, results: dict) -> None:
    """The round's closing records: what was aggregated from whom, then the results."""
    audit.append("aggregate", server_round, {
        "digest": arrays_digest(numpy_arrays(arrays)),
        "updates": seen.accepted,
        "examples": seen.examples,
        "update_digests": seen.update_digests,
    }, sync=False)
    audit.append("round_end", server_round, results)


class RoundRecorder:
    """Flower's per-round hook for one run: ``after_round(round, arrays)``."""

    def __init__(self, run: Run, metrics: ClientMetrics, on_round: RoundCallback):
        self.run, self.metrics, self.on_round = run, metrics, on_round
        self.arrays = run.initial  # the latest global state
        self.clock = run.started
        self.audit_seconds = 0.0

    def resumed_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``after_round`` for a resumed run, whose Flower loop counts from 1 again."""
        return self.after_round(server_round + self.run.offset, arrays) if server_round else None  # round `offset` is done

    def _evaluate(self, server_round: int, arrays: ArrayRecord) -> tuple[float, float, dict[str, float]] | None:
        """(loss, accuracy, each model's accuracy where there are several), on the server or as the clients reported."""
        run, client = self.run, self.metrics.values
        if not run.config.evaluates_on_clients():
            return run.halves.server_evaluate(run.config, arrays, run.model, run.test, run.device)
        if server_round == 0:
            return None  # clients evaluate after each round; the initial model is not sent to them
        per_model = run.halves.reported_per_model(run.config, client)
        return client.get("federated_loss", float("nan")), client.get("federated_accuracy", float("nan")), per_model

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.arrays = arrays
        evaluated = self._evaluate(server_round, arrays)
        if evaluated is None:
            return None
        loss, accuracy, per_model = evaluated
        run, config = self.run, self.run.config
        now = time.perf_counter()
        traffic = run.grid.take_traffic()
        seen = run.access.take_round()
        exchange_audit = run.audit.seconds - self.audit_seconds  # appends while replies came in
        audit_started = time.perf_counter()
        facts, row = run.halves.round_facts(config, run.inner(), server_round) if server_round else ({}, {})
        checkpoint = self._checkpoint(server_round, arrays) if server_round and run.strategy.checkpointable else None
        if server_round:
            audit_round(run.audit, server_round, arrays, seen, {
                "accuracy": accuracy, "loss": loss, "clients": traffic.replies, "failures": traffic.failures,
                "rejected": seen.rejected, "client_metrics": dict(self.metrics.values),
                "privacy": self._privacy_facts(seen, server_round),
                **facts,
                **({"model_accuracy": per_model} if per_model else {}),
                **({"checkpoint": checkpoint.digests()} if checkpoint else {}),
            })
        self.audit_seconds = run.audit.seconds
        timings = {
            "verify_seconds": seen.verify_seconds,
            "sign_seconds": seen.sign_seconds,
            "audit_seconds": exchange_audit + time.perf_counter() - audit_started,
        }
        client_accuracy = self.metrics.accuracy
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            seconds=round(now - self.clock, 4),
            bytes_up=traffic.bytes_up,
            bytes_down=traffic.bytes_down,
            clients=traffic.replies,
            failures=traffic.failures,
            rejected=seen.rejected,
            extra={**self.metrics.values, **{k: round(v, 6) for k, v in timings.items()},
                   **row,
                   **({"client_accuracy": dict(sorted(client_accuracy.items(), key=lambda kv: int(kv[0])))} if client_accuracy else {}),
                   **({"model_accuracy": per_model} if per_model else {})},
        )
        self.metrics.clear()
        self.clock = now
        run.store.add_round(record)
        self._warn_of_drift()
        self.on_round(record)
        # (fedbuff's server updates come from its buffer, which may hold updates pulled before)
        if server_round and traffic.replies == 0 and not run.family.asynchronous:
            first = (
                short_reason(traffic.errors[0])
                if traffic.errors
                else f"no reply within round-timeout={config.round_timeout:g}s"
            )
            raise RoundFailed(
                f"round {server_round}: no client update to aggregate ({traffic.failures} clients failed; "
                f"first error: {first}). The run stopped rather than continue with an unchanged model; "
                f"the rounds so far are in {run.store.directory}"
            )
        if checkpoint is not None:  # after the round_end that names its digests
            checkpoint.audit_seq, checkpoint.audit_head = run.audit.seq, run.audit.head
            checkpoint.save(run.store.directory)
        if server_round and config.target_accuracy and accuracy >= config.target_accuracy:
            raise TargetReached
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    def _warn_of_drift(self) -> None:
        """Log client drift the first time it shows, and keep its latest state for the summary."""
        config = self.run.config
        drift = client_drift(self.run.store.rounds, data.spec(config.dataset).num_classes, config)
        if drift is None:
            return
        if "client_drift" not in self.run.warnings:
            log(WARNING, "%s", drift)
        self.run.warnings["client_drift"] = drift

    def _checkpoint(self, server_round: int, arrays: ArrayRecord) -> Checkpoint:
        """What a resume needs after this round (its place in the audit chain is set once the
        round's records are written)."""
        state_arrays, layout = strategy_state(self.run.strategy)
        return Checkpoint(round=server_round, model=numpy_arrays(arrays), strategy=state_arrays, layout=layout,
                          config_digest=self.run.config.digest(), python_random=self.run.sampling.getstate())

    def _privacy_facts(self, seen: RoundAccess, server_round: int) -> dict:
        facts = self.run.strategy.round_facts(seen.update_digests)
        if self.run.faulty is not None:
            facts["injected_dropouts"] = len(self.run.faulty.dropped.get(server_round, []))
        return facts
