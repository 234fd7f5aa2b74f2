"""Several models as one ArrayRecord: each array named ``<model>/<array>``.

Flower's round loop, checkpoints and the audit digests then carry a set of models (ifca's
clusters, multimodel's models) as one state, and a reply can hold just the models it trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

SEPARATOR = "/"


def pack(states: Mapping[str, Mapping]) -> ArrayRecord:
    """Models (name -> numpy or torch state dict) as one ArrayRecord."""
    arrays = {}
    for model, state in states.items():
        for name, value in state.items():
            value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            arrays[f"{model}{SEPARATOR}{name}"] = Array(value)
    return ArrayRecord(arrays)


def unpack(record: Mapping, models: Sequence[str], *, complete: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """The models of ``record`` (an ArrayRecord, or packed numpy arrays) as numpy state dicts
    under their own names. ValueError for an array of no model in ``models`` and, when
    ``complete``, for a model that is missing."""
    states: dict[str, dict[str, np.ndarray]] = {}
    for key, array in record.items():
        model, _, name = key.partition(SEPARATOR)
        if model not in models or not name:
            raise ValueError(f"array {key!r} is not <model>/<name> for a model of {', '.join(models)}")
        states.setdefault(model, {})[name] = array.numpy() if isinstance(array, Array) else np.asarray(array)
    missing = [m for m in models if m not in states]
    if complete and missing:
        raise ValueError(f"no arrays for model(s) {', '.join(missing)}")
    return states
