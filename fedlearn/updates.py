"""What a reply must be before it reaches a strategy: its size, and for updates in clear their
arrays (names, shapes, dtypes, finite values). Access control calls these on every reply; a
privacy mode checks its own wire format (server.privacy.PrivacyStrategy.check_reply), a strategy
family what it trains (fedlearn.families: ``update_check``)."""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from numpy.lib import format as npformat



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
        try:
            values = array_values(theirs)
        except ValueError as exc:
            raise Rejected(f"malformed update: {exc}") from None
        if not np.isfinite(values).all():
            raise Rejected(f"non-finite update: {name} contains NaN or Inf")


def check_models_update(content, packed: ArrayRecord) -> None:
    """A multimodel update: whole models of the run (packed, fedlearn.packing), any subset of them."""
    from fedlearn.packing import SEPARATOR  # here: packing imports torch, which a key stage's process should not pay for
    trained = {key.partition(SEPARATOR)[0] for key in content["arrays"]} if "arrays" in content else set()
    if not trained:
        raise Rejected("malformed update: it holds none of the run's models")
    check_plain_update(content, ArrayRecord({k: a for k, a in packed.items() if k.partition(SEPARATOR)[0] in trained}))


def array_values(array) -> np.ndarray:
    """The values a strategy will read from a received Flower Array (``Array.numpy()`` follows
    the .npy header, not the Array's declared dtype and shape), or ValueError saying why there
    are none: the header, parsed without pickle, must declare the Array's own dtype, shape and
    C order, and the bytes after it must hold exactly that many values. A big-endian header
    under a declared float32 passed a check of the declared dtype and aggregated as garbage;
    empty bytes made numpy raise EOFError, which stopped a run."""
    try:
        declared = np.dtype(array.dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {array.dtype!r}") from None
    stream = io.BytesIO(array.data)
    try:
        version = npformat.read_magic(stream)
        reader = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}[version]
        shape, fortran_order, dtype = reader(stream)
    except (ValueError, KeyError, SyntaxError, TypeError, OverflowError, EOFError) as exc:
        raise ValueError(f"not a .npy array ({type(exc).__name__})") from None
    if dtype != declared or dtype.hasobject or list(shape) != list(array.shape) or fortran_order:
        raise ValueError(f"its bytes hold {dtype.str}{list(shape)}"
                         f"{' in Fortran order' if fortran_order else ''}, it declares {declared.str}{list(array.shape)}")
    count = math.prod(shape)
    offset = stream.tell()
    if len(array.data) != offset + count * dtype.itemsize:
        raise ValueError(f"{len(array.data) - offset} bytes of values for {count} values of {dtype}")
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=offset)
