"""crypto: Ed25519 key files, fingerprints, signatures and canonical digests."""

import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from crypto import signing
from crypto.digest import arrays_digest, canonical_json


def test_keypair_files_roundtrip_with_private_key_mode_0600(tmp_path):
    private, public, key = signing.write_keypair(tmp_path / "keys", "node-a")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert signing.fingerprint(signing.load_private(private)) == signing.fingerprint(key)
    assert signing.fingerprint(signing.load_public(public)) == signing.fingerprint(key)
    assert len(signing.fingerprint(key)) == 64
    message = b"round 3"
    assert signing.verify(signing.load_public(public), signing.sign(key, message), message)
    assert not signing.verify(signing.load_public(public), signing.sign(key, message), b"round 4")
    with pytest.raises(signing.KeyFileError, match="already exists"):
        signing.write_keypair(tmp_path / "keys", "node-a")


def test_key_files_that_cannot_be_used_are_named(tmp_path):
    private, public, _ = signing.write_keypair(tmp_path, "k")
    with pytest.raises(signing.KeyFileError, match="does not exist"):
        signing.load_private(tmp_path / "missing.key")
    with pytest.raises(signing.KeyFileError, match="is a private key: give the matching .pub"):
        signing.load_public(private)
    with pytest.raises(signing.KeyFileError, match="not an unencrypted PEM private key"):
        signing.load_private(public)
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(signing.KeyFileError, match="not base64"):
        signing.load_public(tmp_path / "junk.pub")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ecdsa = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ec.key").write_bytes(ecdsa)
    with pytest.raises(signing.KeyFileError, match="not an Ed25519 key"):
        signing.load_private(tmp_path / "ec.key")


def test_canonical_json_is_sorted_compact_utf8_and_refuses_nan():
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


named_arrays = st.dictionaries(
    st.text(min_size=1, max_size=8),
    arrays(st.sampled_from([np.float32, np.float64, np.int64]), st.tuples(st.integers(0, 4), st.integers(1, 3))),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(named_arrays)
def test_arrays_digest_ignores_insertion_order_and_byte_order(named):
    reordered = dict(reversed(list(named.items())))
    assert arrays_digest(named) == arrays_digest(reordered)
    big_endian = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in named.items()}
    assert arrays_digest(named) == arrays_digest(big_endian)


@settings(max_examples=60, deadline=None)
@given(named_arrays, st.data())
def test_arrays_digest_changes_with_any_value_name_dtype_or_shape(named, data):
    name = data.draw(st.sampled_from(sorted(named)))
    array = named[name]
    base = arrays_digest(named)
    assert arrays_digest({**named, name + "x": array}) != base
    if array.size:
        changed = array.copy()
        flat = changed.reshape(-1)
        with np.errstate(all="ignore"):
            flat[data.draw(st.integers(0, flat.size - 1))] += 1
        if not np.array_equal(changed, array, equal_nan=True):
            assert arrays_digest({**named, name: changed}) != base
    with np.errstate(all="ignore"):  # float16 may overflow; the digest must still differ
        assert arrays_digest({**named, name: array.astype(np.float16)}) != base
    assert arrays_digest({**named, name: array.reshape(-1)}) != base or array.ndim == 1
