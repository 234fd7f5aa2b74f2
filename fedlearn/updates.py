"""What a reply must be before it reaches a strategy: its size, and for updates in clear their
arrays (names, shapes, dtypes, finite values). Access control calls these on every reply; a
privacy mode checks its own wire format (server.privacy.PrivacyStrategy.check_reply), a strategy
family what it trains (fedlearn.families: ``update_check``)."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from flwr.app import RecordDict
from flwr.common.serde import recorddict_to_proto

from fedlearn.packing import SEPARATOR


def payload_bytes(content: RecordDict) -> int:
    """Serialized size of a message's records (what Flower puts on the wire, minus headers)."""
    return recorddict_to_proto(content).ByteSize()


class Rejected(Exception):
    """A reply failed a check; the message is the audited reason."""


def check_size(content, limit: int) -> None:
    """Refuse an oversized update before hashing or parsing it; measured as MeteredGrid meters
    traffic, so every record counts, not only the arrays."""
    size = payload_bytes(content)
    if size > limit:
        raise Rejected(
            f"oversized update: {_size(size)} exceeds the limit of {_size(limit)} "
            "(raise max-update-mb if the model really is this large)"
        )


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def check_plain_update(content, sent: ArrayRecord) -> None:
    """The update must have the global model's arrays, shapes and dtypes, all finite."""
    got = content["arrays"] if "arrays" in content else None
    if not isinstance(got, ArrayRecord):
        raise Rejected("malformed update: no arrays record")
    if list(got) != list(sent):
        raise Rejected(f"malformed update: arrays {sorted(got)} instead of the model's {sorted(sent)}")
    for name, theirs in got.items():
        mine = sent[name]
        if list(theirs.shape) != list(mine.shape) or theirs.dtype != mine.dtype or theirs.stype != mine.stype:
            raise Rejected(
                f"malformed update: {name} is {theirs.dtype}{list(theirs.shape)}, the model's is {mine.dtype}{list(mine.shape)}"
            )
        if not np.isfinite(_values(theirs)).all():
            raise Rejected(f"non-finite update: {name} contains NaN or Inf")


def check_models_update(content, packed: ArrayRecord) -> None:
    """A multimodel update: whole models of the run (packed, fedlearn.packing), any subset of them."""
    trained = {key.partition(SEPARATOR)[0] for key in content["arrays"]} if "arrays" in content else set()
    if not trained:
        raise Rejected("malformed update: it holds none of the run's models")
    check_plain_update(content, ArrayRecord({k: a for k, a in packed.items() if k.partition(SEPARATOR)[0] in trained}))


def _values(array) -> np.ndarray:
    """The values of a serialized numpy array, in storage order (enough to check finiteness),
    read in place from the end of its bytes instead of parsing the .npy header."""
    try:
        dtype = np.dtype(array.dtype)
    except TypeError:
        raise Rejected(f"malformed update: unknown dtype {array.dtype!r}") from None
    count = int(np.prod(array.shape))
    offset = len(array.data) - count * dtype.itemsize
    if offset < 0:
        raise Rejected(f"malformed update: {count} values of {dtype} do not fit in {len(array.data)} bytes")
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=offset)
