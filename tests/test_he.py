"""crypto.he: homomorphic sums against the numpy reference, key handling, what the server can do."""

from __future__ import annotations

import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.fixedpoint import FixedPoint
from crypto.he import Encrypted, HEKey, HEKeyError, HESum, Layout, generate_pair, plain_modulus_bits


@pytest.fixture(scope="module")
def bfv_key():
    return HEKey.generate("bfv", 64)


@pytest.fixture(scope="module")
def ckks_key():
    return HEKey.generate("ckks", 64)


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(1, 20000),
    terms=st.integers(1, 64),
    bits=st.integers(4, 24),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**32 - 1),
)
def test_bfv_sum_matches_the_plain_sum_within_the_bound(bfv_key, length, terms, bits, scale, seed):
    rng = np.random.default_rng(seed)
    layout = Layout("bfv", length, terms, bits)
    ranges = np.full(length, scale)
    try:
        summer = HESum(bfv_key, layout, ranges)
        layout.packing(bfv_key)
    except ValueError as exc:  # too many bits for one slot: a clear error, never a wrong sum
        assert "fewer" in str(exc)
        return
    server = HESum(bfv_key.public(), layout, ranges)
    values = [rng.uniform(-scale, scale, length) for _ in range(terms)]
    weights = rng.uniform(0.01, 1.0, terms)
    total = server.add([summer.encode(x, float(w)) for x, w in zip(values, weights)])
    decoded, weight = summer.decode(total)
    expected = sum(w * x for x, w in zip(values, weights))
    assert weight == pytest.approx(weights.sum())
    assert np.abs(decoded - expected).max() <= FixedPoint(bits).error_bound(terms, scale) * (1 + 1e-9)


@settings(max_examples=10, deadline=None)
@given(length=st.integers(1, 5000), terms=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_ckks_sum_matches_the_plain_sum(ckks_key, length, terms, seed):
    rng = np.random.default_rng(seed)
    layout = Layout("ckks", length, terms)
    summer, server = HESum(ckks_key, layout), HESum(ckks_key.public(), layout)
    values = [rng.normal(0, 3, length) for _ in range(terms)]
    weights = rng.uniform(0.01, 1.0, terms)
    decoded, _ = summer.decode(server.add([summer.encode(x, float(w)) for x, w in zip(values, weights)]))
    assert np.abs(decoded - sum(w * x for x, w in zip(values, weights))).max() < 1e-5


def test_more_terms_than_the_layout_allows_is_an_error_not_an_overflow(bfv_key):
    layout = Layout("bfv", 10, 2, 16)
    summer = HESum(bfv_key, layout, 1.0)
    parts = [summer.encode(np.ones(10), 1.0) for _ in range(3)]
    with pytest.raises(ValueError, match="overflow"):
        summer.add(parts)
    with pytest.raises(HEKeyError, match="--max-clients"):
        HESum(bfv_key, Layout("bfv", 10, 65, 16), 1.0)


def test_noise_budget_shrinks_the_plain_modulus_with_more_clients():
    assert plain_modulus_bits(10) > plain_modulus_bits(1000)
    assert plain_modulus_bits(1000) + 10 <= 55


def test_the_server_context_holds_no_key_and_cannot_decrypt(bfv_key, ckks_key):
    for key in (bfv_key, ckks_key):
        public = HEKey.from_bytes(key.public().to_bytes())
        assert not public.context.has_secret_key() and not public.secret
        assert len(public.to_bytes()) < 400  # parameters only
        layout = Layout(key.info.scheme, 100, 4, 16)
        contribution = HESum(key, layout, 1.0).encode(np.ones(100), 1.0)
        server = HESum(public, layout, 1.0)
        with pytest.raises(HEKeyError, match="no secret key"):
            server.decode(contribution)
        with pytest.raises(HEKeyError, match="no secret key"):
            server.encode(np.ones(100), 1.0)
        # Below our guard, TenSEAL itself refuses: the context has nothing to decrypt with.
        import tenseal as ts

        load = ts.bfv_vector_from if key.info.scheme == "bfv" else ts.ckks_vector_from
        with pytest.raises(ValueError, match="secret"):
            load(public.context, contribution.chunks[0]).decrypt()


def test_key_files(tmp_path):
    secret_path, public_path = generate_pair(tmp_path, "bfv", 10)
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    secret, public = HEKey.load(secret_path, secret=True), HEKey.load(public_path, secret=False)
    assert secret.info.context_id == public.info.context_id
    with pytest.raises(HEKeyError, match="wrong kind"):
        HEKey.load(public_path, secret=True)
    with pytest.raises(HEKeyError, match="wrong kind"):
        HEKey.load(secret_path, secret=False)
    with pytest.raises(HEKeyError, match="already exists"):
        generate_pair(tmp_path, "bfv", 10)
    with pytest.raises(HEKeyError, match="does not exist"):
        HEKey.load(tmp_path / "missing", secret=True)
    (tmp_path / "junk").write_bytes(b"not a key")
    with pytest.raises(HEKeyError, match="not a fedlearn HE key"):
        HEKey.load(tmp_path / "junk", secret=True)
    damaged = bytearray(public_path.read_bytes())
    damaged[-20:] = b"x" * 20
    (tmp_path / "damaged").write_bytes(bytes(damaged))
    with pytest.raises(HEKeyError, match="corrupted"):
        HEKey.load(tmp_path / "damaged", secret=False)


def test_malformed_ciphertexts_are_refused_by_the_check(bfv_key):
    layout = Layout("bfv", 5000, 4, 16)
    summer, server = HESum(bfv_key, layout, 1.0), HESum(bfv_key.public(), layout, 1.0)
    good = summer.encode(np.zeros(5000), 0.5)
    server.check(good)
    other = HEKey.generate("bfv", 1000)  # other parameters (a smaller plaintext modulus)
    cases = {
        "ciphertexts instead": Encrypted(good.chunks + good.chunks, 0.5),
        "not a valid": Encrypted((b"\x00" * 100,), 0.5),
        "positive": Encrypted(good.chunks, float("nan")),
    }
    for reason, bad in cases.items():
        with pytest.raises(ValueError, match=reason):
            server.check(bad)
    foreign = HESum(other, layout, 1.0).encode(np.zeros(5000), 0.5)
    with pytest.raises(ValueError, match="not a valid"):
        server.check(foreign)


def test_a_pool_of_encryption_workers_gives_the_same_sums(bfv_key):
    layout = Layout("bfv", 40000, 4, 16)
    values = np.random.default_rng(1).normal(size=40000)
    pooled = HESum(bfv_key, layout, 8.0, workers=2).encode(values, 0.5)
    single = HESum(bfv_key, layout, 8.0).encode(values, 0.5)
    assert len(pooled.chunks) == len(single.chunks) == layout.chunks(bfv_key) > 1
    for encrypted in (pooled, single):
        decoded, _ = HESum(bfv_key, layout, 8.0).decode(encrypted)
        assert np.abs(decoded - 0.5 * values).max() <= FixedPoint(16).error_bound(1, 8.0)


def test_an_oversized_ciphertext_is_refused_before_parsing(bfv_key):
    layout = Layout("bfv", 100, 4, 16)
    with pytest.raises(ValueError, match="more than a ciphertext of this context can"):
        HESum(bfv_key.public(), layout, 1.0).check(Encrypted((b"\x00" * 10_000_000,), 0.5))
