"""The client half of a privacy mode: how a node reads the global state it is sent, how it
encodes its update, and how it answers the mode's own stages. fedlearn.privacy names each
mode's half; the ClientApp (clients.app) trains, signs, and leaves the rest to the half."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Context, Message

StageAnswer = Callable[[Message, Context, object], dict]  # (request, context, node task) -> reply records


def clear_state(msg: Message, config) -> tuple[dict[str, np.ndarray], None]:
    """The global state as sent: arrays in clear."""
    return {k: v.numpy() for k, v in msg.content["arrays"].items()}, None


def clear_update(msg: Message, context: Context, task, received, state: dict, num_examples: int) -> dict:
    """The update as trained: arrays in clear."""
    return {"arrays": ArrayRecord(state)}


@dataclass(frozen=True)
class ClientHalf:
    # (request, config) -> (the global state as numpy arrays, what decoding kept for encoding)
    decode: Callable = clear_state
    # (request, context, task, the round (fedlearn.families.ClientRound: .arrays, .decoded), trained state as tensors,
    # examples) -> reply records
    encode: Callable = clear_update
    stages: Mapping[str, StageAnswer] = field(default_factory=dict)  # message type -> its answer


PLAIN = ClientHalf()  # privacy=plain: everything in clear
