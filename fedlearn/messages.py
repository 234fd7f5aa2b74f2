"""Names of the records fedlearn's ServerApp and ClientApp exchange, and the digest of a reply.

Flower's strategies use ``arrays``, ``metrics`` and ``config``; we add ``node``, a
ConfigRecord in which a client says which data partition it holds, and ``auth``: in a request,
the server's challenge (run id, round, nonce); in a reply, the node's public key and its
signature over the challenge and the digest of every other record of the reply.
"""

from __future__ import annotations

import hashlib
import math

from flwr.app import ArrayRecord, RecordDict

from crypto.digest import canonical_json

NODE_RECORD = "node"
PARTITION_KEY = "partition-id"
AUTH_RECORD = "auth"
HE_RECORD = "he"  # privacy=he: how to read the encrypted model (request) or contribution (reply)
SECAGG_RECORD = "secagg"  # privacy=secagg: a stage's keys, shares and the round's plan
NUM_EXAMPLES_KEY = "num-examples"
# The weight cap's question (he, he-threshold): how many examples a node trains on, answered signed
# (a count a server weights by is an input like an update) before the training request.
NUM_EXAMPLES_QUERY = "query.num_examples"
PERSONAL_RECORD = "personal"  # fedper: a node's own layers, in its Flower context (never sent)


def payload_digest(content: RecordDict) -> str:
    """SHA-256 of a message's records except ``auth``, as serialized: each array's name, dtype,
    shape, serialization type and serialized bytes (what travels; no deserialization needed),
    other records as typed canonical JSON. The same on the node that signs and the server."""
    h = hashlib.sha256()
    for name in sorted(content):
        if name == AUTH_RECORD:
            continue
        record = content[name]
        if isinstance(record, ArrayRecord):
            h.update(canonical_json([name, "arrays"]) + b"\n")
            for key in sorted(record):
                array = record[key]
                h.update(canonical_json([key, array.dtype, list(array.shape), array.stype, len(array.data)]) + b"\n")
                h.update(array.data)
        else:
            h.update(canonical_json([name, type(record).__name__, {k: _typed(v) for k, v in record.items()}]) + b"\n")
    return h.hexdigest()


def _typed(value):
    """A JSON form that keeps types apart and floats exact (float.hex also covers NaN/inf)."""
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value.hex() if math.isfinite(value) else repr(value)]
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    if isinstance(value, str):
        return ["str", value]
    if isinstance(value, list):
        return ["list", [_typed(v) for v in value]]
    raise TypeError(f"cannot digest a record value of type {type(value).__name__}")
