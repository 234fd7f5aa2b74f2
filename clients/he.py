"""A node's side of privacy=he (see fedlearn.he): decrypt the aggregate the server sends,
encrypt the trained update. The secret context is the node's (he-secret); the server has none."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from flwr.app import ConfigRecord, Context, Message

from clients.privacy import ClientHalf
from crypto.he import HEKey, HEKeyError
from fedlearn import he
from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError
from fedlearn.messages import HE_RECORD


@lru_cache(maxsize=8)
def _load_he_key(path: str) -> HEKey:
    try:
        return HEKey.load(path, secret=True)
    except HEKeyError as exc:
        raise ConfigError([f"he-secret: {exc}"]) from None


def he_codec(msg: Message, config: RunConfig, template: dict) -> he.ModelCodec:
    """The node's secret HE context (he-secret of its node config, else of the run config)."""
    if not config.he_secret:
        raise ConfigError(
            ["privacy=he but this node has no secret HE context: start it with --node-config 'he-secret=PATH' "
             "(the he.secret written by `fedlearn keys he-generate`)"]
        )
    key = _load_he_key(config.he_secret)
    wanted = str(msg.content[HE_RECORD]["context-id"])
    if key.info.context_id != wanted:
        raise ConfigError([f"he-secret {config.he_secret} belongs to another HE key pair than the server's public context"])
    return he.ModelCodec(key, template, config.he_bits, config.he_range_factor(), config.he_workers)


class Decrypted:
    """What encrypting the update needs from decrypting the global state."""

    def __init__(self, codec: he.ModelCodec, previous: dict | None):
        self.codec = codec
        self.previous = previous  # fedavgm: the global model of the round before


def decrypted_state(msg: Message, config: RunConfig) -> tuple[dict[str, np.ndarray], Decrypted]:
    """The global state: the decrypted aggregate (the clear initial model before the first one)."""
    from fedlearn import strategies  # torch: imported by the messages that need a model only

    initial = {k: v.numpy() for k, v in strategies.initial_state(config).items()}
    template = {k: np.zeros_like(v) for k, v in initial.items()}
    codec = he_codec(msg, config, template)
    state = msg.content[HE_RECORD]
    record = msg.content["arrays"]
    if state["encrypted"]:
        arrays = codec.decrypt(he.record_chunks(record), he.StateMeta.from_record(state))
    else:
        arrays = {k: v.numpy() for k, v in record.items()}
    previous = None
    if he.PREVIOUS_RECORD in msg.content:
        previous = codec.decrypt(he.record_chunks(msg.content[he.PREVIOUS_RECORD]), he.StateMeta.from_record(state, "previous-"))
    elif state["encrypted"]:  # round 2: the model before the first aggregate is the public initial one
        previous = initial
    return arrays, Decrypted(codec, previous)


def encrypted_update(msg: Message, task, received, local: dict, num_examples: int) -> dict:
    """The records of an encrypted training reply."""
    plan = msg.content[HE_RECORD]
    cap, max_terms = int(plan["weight-cap"]), int(plan["max-terms"])
    if num_examples > cap:
        raise ConfigError([f"this node trained on {num_examples} examples but told the server {cap} at most"])
    config, decrypted = task.config, received.decoded
    if config.strategy == "fedavgm":  # the server only adds: its momentum step is folded into each contribution
        values = he.contribution_values(local, received.arrays, decrypted.previous, config.server_lr, config.server_momentum)
    else:
        values = he.flatten(local)
    codec = decrypted.codec
    exponents = codec.exponents_for(received.arrays)
    encrypted = codec.encrypt(values, num_examples / cap, max_terms, exponents)
    meta = ConfigRecord({"weight": encrypted.weight, "range-exp": list(exponents), "clipped": encrypted.clipped})
    return {"arrays": he.encrypted_record(encrypted.chunks), HE_RECORD: meta}


def _encode(msg: Message, context: Context, task, received, state: dict, num_examples: int) -> dict:
    return encrypted_update(msg, task, received, {k: v.numpy() for k, v in state.items()}, num_examples)


CLIENT = ClientHalf(decode=decrypted_state, encode=_encode)
