"""The ``he`` privacy mode between model arrays and ciphertexts (crypto.he does the cryptography).

What travels (record names in fedlearn.messages):

- Server -> client: ``arrays`` holds the global model, in clear in round 1 (the seeded initial
  model is public) and afterwards as the encrypted aggregate of the last round: ciphertext
  chunks ``ct-00000``... as uint8 arrays. The ``he`` ConfigRecord says how to read it (number
  of terms, total weight, layout, per-tensor ranges) and, in training requests, the round's
  ``max-terms`` (clients sampled) and ``weight-cap`` (the largest example count among them).
- Client -> server: ``arrays`` holds the client's encrypted contribution, ``he`` its weight
  (example count / weight-cap, in clear), its ranges and how many values it clipped.

Clients decrypt the state, divide by the total weight, train, and encrypt
``(num_examples / weight_cap) * model``: the server's sum divided by the total weight is the
example-weighted average, exactly FedAvg. FedAvgM's server momentum is linear, so clients fold it
into what they encrypt (see ``contribution_values``): the server still only adds ciphertexts.

bfv ranges (fedlearn.encoding): each tensor is clipped to +-2**e, e = ceil(log2(he-range * max|global tensor|)),
the same on every client because all decrypt the same global model. The exponents travel in
clear: the server learns the order of magnitude of each tensor of the global model, nothing else.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from crypto.he import Encrypted, HEKey, HEKeyError, HESum, Layout
from fedlearn import families
from fedlearn.encoding import expand_ranges, flatten, range_exponents, unflatten
from fedlearn.updates import array_values

CHUNK_PREFIX = "ct-"
PREVIOUS_RECORD = "he-previous"  # fedavgm: the state before the current one


@dataclass(frozen=True)
class StateMeta:
    """How to read an encrypted state (what the ``he`` record says about it)."""

    terms: int
    weight: float
    max_terms: int
    exponents: tuple[int, ...]

    def to_record(self, prefix: str = "") -> dict:
        return {f"{prefix}terms": self.terms, f"{prefix}weight": self.weight,
                f"{prefix}max-terms": self.max_terms, f"{prefix}range-exp": list(self.exponents)}

    @classmethod
    def from_record(cls, record, prefix: str = "") -> StateMeta:
        return cls(int(record[f"{prefix}terms"]), float(record[f"{prefix}weight"]),
                   int(record[f"{prefix}max-terms"]), tuple(int(e) for e in record[f"{prefix}range-exp"]))


def chunks_to_arrays(chunks) -> dict[str, np.ndarray]:
    return {f"{CHUNK_PREFIX}{i:05d}": np.frombuffer(c, dtype=np.uint8) for i, c in enumerate(chunks)}


def encrypted_record(chunks) -> ArrayRecord:
    """Ciphertexts as the ArrayRecord that carries them (the encrypted model or an update)."""
    return ArrayRecord({name: Array(array) for name, array in chunks_to_arrays(chunks).items()})


def record_chunks(record: ArrayRecord) -> tuple[bytes, ...]:
    """The ciphertext blobs of a received record (ValueError: it holds none that parse)."""
    return arrays_to_chunks({name: array_values(array) for name, array in record.items()})


def arrays_to_chunks(arrays: dict[str, np.ndarray]) -> tuple[bytes, ...]:
    names = sorted(arrays)
    if names != [f"{CHUNK_PREFIX}{i:05d}" for i in range(len(names))]:
        raise ValueError(f"expected ciphertext arrays {CHUNK_PREFIX}00000..., got {names[:3]}...")
    return tuple(np.asarray(arrays[n], dtype=np.uint8).tobytes() for n in names)


class ModelCodec:
    """Encrypts and decrypts one model architecture's arrays under one HE key and config."""

    def __init__(self, key: HEKey, template: dict[str, np.ndarray], bits: int, range_factor: float, workers: int = 1):
        self.key, self.template, self.workers = key, template, workers
        self.length = sum(int(np.prod(a.shape)) for a in template.values())
        self.bits, self.range_factor = bits, range_factor

    def layout(self, max_terms: int) -> Layout:
        return Layout(self.key.info.scheme, self.length, max_terms, self.bits)

    def summer(self, max_terms: int, exponents) -> HESum:
        ranges = self._ranges(tuple(exponents)) if self.key.info.scheme == "bfv" else None
        return HESum(self.key, self.layout(max_terms), ranges, self.workers)

    @functools.lru_cache(maxsize=4)
    def _ranges(self, exponents: tuple[int, ...]) -> np.ndarray:
        return expand_ranges(list(exponents), self.template)

    def exponents_for(self, global_arrays: dict[str, np.ndarray]) -> tuple[int, ...]:
        if self.key.info.scheme != "bfv":
            return ()
        return tuple(range_exponents({n: global_arrays[n] for n in self.template}, self.range_factor))

    _decrypted: OrderedDict[str, dict] = OrderedDict()  # per process: the last models decrypted

    def decrypt(self, chunks, meta: StateMeta) -> dict[str, np.ndarray]:
        """The model an encrypted state stands for (weighted sum / total weight). The same
        aggregate arrives for evaluation, then for the next round's training, and in simulation
        at every node a process runs: the last two are kept, keyed by their digest."""
        digest = hashlib.sha256(f"{self.key.info.context_id}{meta}{list(self.template)}".encode())
        for chunk in chunks:
            digest.update(chunk)
        cache, key = ModelCodec._decrypted, digest.hexdigest()
        if key not in cache:
            total = Encrypted(tuple(chunks), meta.weight, meta.terms)
            weighted, weight = self.summer(meta.max_terms, meta.exponents).decode(total)
            cache[key] = unflatten(weighted / weight, self.template)
            while len(cache) > 2:
                cache.popitem(last=False)
        return {name: array.copy() for name, array in cache[key].items()}

    def encrypt(self, values: np.ndarray, weight: float, max_terms: int, exponents) -> Encrypted:
        return self.summer(max_terms, exponents).encode(values, weight)


def contribution_values(
    local: dict[str, np.ndarray],
    current: dict[str, np.ndarray],
    previous: dict[str, np.ndarray] | None,
    server_lr: float = 1.0,
    server_momentum: float = 0.0,
) -> np.ndarray:
    """What a client encrypts so that the weighted average of all contributions is the next
    global model. FedAvg: the local model. FedAvgM (Flower's rule: m = beta*m + (G - avg),
    G' = G - lr*m): G - lr*(beta*m_prev + G - local), with m_prev = (G_prev - G)/lr recovered
    from the two last global models (zero in round 1)."""
    local_v, current_v = flatten(local), flatten(current)
    if server_lr == 1.0 and server_momentum == 0.0:
        return local_v
    momentum = (flatten(previous) - current_v) / server_lr if previous is not None else 0.0
    return current_v - server_lr * (server_momentum * momentum + current_v - local_v)


def decrypt_saved_model(path, key: HEKey, template: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The clear model of a run's ``model.he.safetensors`` (written by the server under he)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    arrays = load_file(str(path))
    if meta.get("encrypted") == "false":
        return arrays  # the run ended before any aggregate: the public initial model
    if meta.get("context_id") != key.info.context_id:
        raise HEKeyError(f"{path} was encrypted under another HE key pair than this secret context")
    state = StateMeta(int(meta["terms"]), float(meta["weight"]), int(meta["max_terms"]),
                      tuple(int(e) for e in meta["range_exp"].split(",") if e))
    codec = ModelCodec(key, template, int(meta["bits"]), 1.0)
    return codec.decrypt(arrays_to_chunks(arrays), state)


def config_problems(config) -> list[str]:
    """privacy=he's own config checks (fedlearn.config runs the generic ones)."""
    why = "the server only adds ciphertexts and never sees an update or the model in clear"
    problems = []
    family = families.find(config.strategy)
    if family is not None and family.aggregate != families.SUM and not family.needs_clear_updates:  # those have a message of their own
        problems.append(
            f"strategy={config.strategy} cannot run with privacy=he: it needs "
            + ("each update in clear" if family.aggregate == families.PER_UPDATE else "a non-linear step on the clear aggregate")
            + f", but {why}; use one of {', '.join(families.sum_strategies())}"
        )
    if config.evaluate_on == "server":
        problems.append(f"evaluate-on=server cannot work with privacy=he: {why}; use evaluate-on=clients (or auto)")
    return problems
