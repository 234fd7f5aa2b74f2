"""The run's checkpoint: what a restarted server needs to continue the same run.

One file, ``checkpoint.safetensors`` in the run directory, rewritten atomically after every
round: the global model, the strategy's own state (server momentum, Adam moments), the round
number, the server's random generators, and where the audit chain stood. Safetensors holds
only arrays and string metadata, so reading a checkpoint never runs code (no pickle).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlearn.errors import FedlearnError

FILE = "checkpoint.safetensors"
FORMAT = "fedlearn-checkpoint/1"


class CheckpointError(FedlearnError):
    """The checkpoint is missing, damaged or from another run."""


@dataclass
class Checkpoint:
    round: int
    model: dict[str, np.ndarray]  # the global model after ``round``
    strategy: dict[str, np.ndarray] = field(default_factory=dict)  # flattened strategy state
    layout: dict[str, Any] = field(default_factory=dict)  # how to rebuild the strategy state
    config_digest: str = ""
    audit_seq: int = 0  # records in the audit log when the checkpoint was taken
    audit_head: str = ""
    python_random: Any = None  # the run's sampling generator's getstate() (Flower samples nodes with it)

    def digests(self) -> dict[str, str]:
        """SHA-256 of the model and of the rest of the state a resume restores (strategy state and
        its layout, the random generator): the round's audit record carries them, so an edited
        checkpoint is refused instead of resumed."""
        from crypto.digest import arrays_digest, canonical_json, sha256_hex

        state = {"strategy": arrays_digest(self.strategy), "layout": self.layout, "python_random": self.python_random}
        return {"model": arrays_digest(self.model), "state": sha256_hex(canonical_json(state))}

    def save(self, directory: Path) -> Path:
        from safetensors.numpy import save

        from fedlearn.runs import atomic_write

        arrays = {f"model/{k}": np.ascontiguousarray(v) for k, v in self.model.items()}
        arrays.update({f"strategy/{k}": np.ascontiguousarray(v) for k, v in self.strategy.items()})
        metadata = {
            "format": FORMAT,
            "round": str(self.round),
            "config_digest": self.config_digest,
            "audit_seq": str(self.audit_seq),
            "audit_head": self.audit_head,
            "layout": json.dumps(self.layout),
            "python_random": json.dumps(self.python_random),
        }
        path = Path(directory) / FILE
        atomic_write(path, save(arrays, metadata=metadata))
        return path

    @classmethod
    def load(cls, directory: Path) -> Checkpoint:
        from safetensors import SafetensorError
        from safetensors.numpy import load

        path = Path(directory) / FILE
        if not path.is_file():
            raise CheckpointError(
                f"{path} not found: this run directory has no checkpoint (it stopped before its first round "
                "ended, or it is not a run directory); start a new run instead"
            )
        raw = path.read_bytes()
        try:
            arrays = load(raw)
            metadata = _metadata(raw)
            if metadata.get("format") != FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT}")
            state = json.loads(metadata["python_random"])
            checkpoint = cls(
                round=int(metadata["round"]),
                model={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("model/")},
                strategy={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("strategy/")},
                layout=json.loads(metadata["layout"]),
                config_digest=metadata["config_digest"],
                audit_seq=int(metadata["audit_seq"]),
                audit_head=metadata["audit_head"],
                python_random=(state[0], tuple(state[1]), state[2]) if state else None,
            )
        except (SafetensorError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{path} is damaged ({exc}); the run cannot be resumed from it") from None
        if not checkpoint.model:
            raise CheckpointError(f"{path} holds no model; the run cannot be resumed from it")
        return checkpoint

    def restore_random(self, generator: random.Random) -> None:
        """Continue ``generator`` (the run's node sampling) from where the checkpointed run left it."""
        if self.python_random is not None:
            generator.setstate(self.python_random)


def _metadata(raw: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file (the JSON header's __metadata__)."""
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size])["__metadata__"]
