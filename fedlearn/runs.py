"""The run directory: everything a run leaves behind, written so that a crash loses nothing.

Layout of ``<out-dir>/<run-id>/``: ``config.toml`` (resolved config), ``metrics.json`` (one
record per round), ``summary.json``, ``model.safetensors``, ``accuracy.png``, ``audit.jsonl``
with ``audit.pub`` (and ``audit.key``, ``policy.toml`` and ``keys/`` when generated). JSON and
model files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from fedlearn.config import RunConfig, load_toml
from fedlearn.errors import FedlearnError


@dataclass
class RoundRecord:
    round: int
    accuracy: float
    loss: float
    seconds: float  # wall time of this round (training, aggregation, evaluation)
    bytes_up: int  # client -> server payload bytes this round
    bytes_down: int  # server -> client payload bytes this round
    clients: int = 0  # training updates accepted
    failures: int = 0  # training messages answered with an error, not at all, or rejected
    rejected: int = 0  # of the failures: replies refused by access control
    extra: dict[str, float] = field(default_factory=dict)  # e.g. train_loss, train_accuracy

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record.update(record.pop("extra"))
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RoundRecord:
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in record.items() if k in names},
                   extra={k: v for k, v in record.items() if k not in names})


# Near chance: within this much of 1/classes; learning on their own data: this far above it.
DRIFT_NEAR_CHANCE, DRIFT_LOCAL_GAIN = 0.05, 0.25


def client_drift(rounds: list[RoundRecord], num_classes: int, config: RunConfig) -> str | None:
    """A warning when, in the latest round, the global model's test accuracy is near chance while
    the clients' own training accuracy is well above it: their local models drift apart and no
    longer average into a working one. It names the keys to lower, with their values; None when
    all is well (or nothing is known yet: round 0 is the initial model)."""
    if not rounds or rounds[-1].round < 1:
        return None
    last, chance = rounds[-1], 1.0 / num_classes
    train = last.extra.get("train_accuracy")
    if train is None or not last.accuracy <= chance + DRIFT_NEAR_CHANCE or not train >= chance + DRIFT_LOCAL_GAIN:
        return None
    lower = [f"lr (now {config.lr:g})", f"local-epochs (now {config.local_epochs})"]
    if config.optimizer == "momentum":
        lower.append(f"momentum (now {config.momentum:g})")
    return (f"client drift: after round {last.round} the global model's test accuracy is {last.accuracy:.2f}, near chance "
            f"({chance:.2f}), while the clients reach {train:.2f} on their own data: their local models no longer "
            f"average into a working one; lower {', '.join(lower)}, or raise batch-size (now {config.batch_size})")


RUN_DIR_LABEL = "run dir   "  # the last line a command that made a run prints, before the path


def printed_run_dir(output: str) -> Path:
    """The run directory a command named on its last line (for scripts and benchmarks)."""
    last = output.strip().splitlines()[-1] if output.strip() else ""
    if not last.startswith(RUN_DIR_LABEL):
        raise ValueError(f"the output does not end with a run directory line: {last[:200]!r}")
    return Path(last.removeprefix(RUN_DIR_LABEL))


def recorded_rounds(directory: Path, upto_round: int) -> list[RoundRecord]:
    """Rounds 0..``upto_round`` of a run's metrics.json, or a FedlearnError saying what is wrong
    with the file (a resumed run keeps them: a history with holes would be saved as whole)."""
    path = Path(directory) / "metrics.json"
    fix = "restore it (it is rewritten after every round), or start a new run"
    try:
        recorded = json.loads(path.read_bytes())
        rounds = [RoundRecord.from_json(r) for r in recorded if r["round"] <= upto_round]
    except FileNotFoundError:
        raise FedlearnError(f"{path} not found: {fix}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FedlearnError(f"{path} is not a metrics file fedlearn wrote ({type(exc).__name__}: {exc}): {fix}") from None
    found = [r.round for r in rounds]
    if found != list(range(upto_round + 1)):
        raise FedlearnError(f"{path} holds rounds {found}, the checkpoint needs rounds 0..{upto_round}: {fix}")
    return rounds


def new_run_id() -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


class RunStore:
    """Writes one run's directory. Created once per run by whoever drives the rounds."""

    def __init__(self, directory: Path, config: RunConfig, run_id: str):
        self.directory = directory
        self.config = config
        self.run_id = run_id
        self.rounds: list[RoundRecord] = []

    @classmethod
    def create(cls, config: RunConfig, run_id: str | None = None) -> RunStore:
        run_id = run_id or new_run_id()
        directory = Path(config.out_dir).expanduser().resolve() / run_id
        directory.mkdir(parents=True, exist_ok=False)
        store = cls(directory, config, run_id)
        atomic_write(directory / "config.toml", config.to_toml().encode())
        return store

    @classmethod
    def reopen(cls, directory: Path, config: RunConfig, upto_round: int) -> RunStore:
        """Continue a run directory (resume): keep its rounds up to the checkpoint's; a round
        recorded after it was cut short by the crash and will be run again."""
        if (directory / "summary.json").exists():
            raise FedlearnError(f"{directory} holds a finished run (summary.json): nothing to resume")
        store = cls(directory, config, directory.name)
        store.rounds = recorded_rounds(directory, upto_round)  # metrics.json is rewritten with the next round
        return store

    def update_config(self, config: RunConfig) -> None:
        """Record the config as run (e.g. with the generated access policy filled in)."""
        self.config = config
        atomic_write(self.directory / "config.toml", config.to_toml().encode())

    def add_round(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        payload = json.dumps([r.to_json() for r in self.rounds], indent=1)
        atomic_write(self.directory / "metrics.json", payload.encode())

    def save_model(self, state: dict[str, np.ndarray], name: str = "model.safetensors", metadata: dict[str, str] | None = None) -> Path:
        """Save arrays (the model, or under privacy=he its ciphertexts) with safetensors."""
        from safetensors.numpy import save

        path = self.directory / name
        metadata = {"run_id": self.run_id, "model": self.config.model, "dataset": self.config.dataset, **(metadata or {})}
        arrays = {name: np.ascontiguousarray(value) for name, value in state.items()}
        atomic_write(path, save(arrays, metadata=metadata))
        return path

    def finish(self, total_seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        last = self.rounds[-1] if self.rounds else None
        summary = {
            "run_id": self.run_id,
            "strategy": self.config.strategy,
            "privacy": self.config.privacy,
            "model": self.config.model,
            "dataset": self.config.dataset,
            "num_clients": self.config.num_clients,
            "rounds": max((r.round for r in self.rounds), default=0),
            "final_accuracy": last.accuracy if last else None,
            "final_loss": last.loss if last else None,
            "best_accuracy": max((r.accuracy for r in self.rounds), default=None),
            "total_seconds": round(total_seconds, 3),
            "bytes_up": sum(r.bytes_up for r in self.rounds),
            "bytes_down": sum(r.bytes_down for r in self.rounds),
            "config_digest": self.config.digest(),
        }
        summary.update(extra or {})
        atomic_write(self.directory / "summary.json", json.dumps(summary, indent=1).encode())
        self.plot()
        return summary

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = self.directory / "accuracy.png"
        rounds = [r.round for r in self.rounds]
        fig, acc_axis = plt.subplots(figsize=(6, 3.5), dpi=100)
        dots = len(rounds) <= 50  # markers help on short runs and clutter long ones
        acc_axis.plot(rounds, [r.accuracy for r in self.rounds], "o-" if dots else "-", color="tab:blue", label="accuracy")
        acc_axis.set_xlabel("round")
        acc_axis.set_ylabel("test accuracy", color="tab:blue")
        acc_axis.set_ylim(0, 1)
        loss_axis = acc_axis.twinx()
        loss_axis.plot(rounds, [r.loss for r in self.rounds], "s--" if dots else "--", color="tab:red", label="loss")
        loss_axis.set_ylabel("test loss", color="tab:red")
        acc_axis.set_title(f"run {self.run_id}: {self.config.strategy}, privacy={self.config.privacy}, "
                           f"{self.config.model} on {self.config.dataset}", fontsize=9)
        fig.tight_layout()
        tmp = path.with_name(".accuracy.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(path)
        return path


def load_run_config(directory: Path) -> RunConfig:
    """The config a run directory was run with (its config.toml)."""
    path = Path(directory) / "config.toml"
    if not path.is_file():
        raise FedlearnError(f"{path} not found: {directory} is not a run directory (fedlearn simulate writes them)")
    return RunConfig.from_flat(load_toml(path))


def load_model(path: Path) -> dict[str, np.ndarray]:
    """Read a saved model (safetensors: no pickle, safe on untrusted files)."""
    from safetensors.numpy import load_file

    return load_file(str(path))
