"""crypto.secagg building blocks: agreement, masks, Shamir shares of seeds, sealed shares."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import secagg
from crypto.fixedpoint import FixedPoint


def test_both_sides_agree_and_the_context_separates_secrets():
    a, b = secagg.generate_key(), secagg.generate_key()
    ab = secagg.agree(a, secagg.public_bytes(b), b"run-1/round-3")
    assert ab == secagg.agree(b, secagg.public_bytes(a), b"run-1/round-3")
    assert len(ab) == 32  # a 256-bit secret
    assert ab != secagg.agree(a, secagg.public_bytes(b), b"run-1/round-4")
    with pytest.raises(ValueError, match="X25519"):
        secagg.agree(a, b"short", b"x")


def test_pairwise_masks_cancel_and_the_sum_is_exact():
    bits, n, length = 24, 5, 1000
    encoding = FixedPoint(16)
    keys = [secagg.generate_key() for _ in range(n)]
    publics = [secagg.public_bytes(k) for k in keys]
    rng = np.random.default_rng(0)
    inputs = [encoding.encode(rng.normal(size=length), 1.0, 4.0)[0] for _ in range(n)]
    modulus = np.uint64(1 << bits)
    masked = []
    for i in range(n):
        y = inputs[i].copy()
        for j in range(n):
            if i == j:
                continue
            mask = secagg.expand(secagg.agree(keys[i], publics[j], b"r1"), length, bits)
            y = (y + mask) % modulus if i < j else (y - mask) % modulus
        masked.append(y)
    total = sum(masked) % modulus
    assert (total == sum(inputs) % modulus).all()


def test_a_masked_input_looks_uniform_and_independent_of_the_input():
    """One client's masked value over many fresh masks: chi-square uniformity of its top byte and
    no correlation with the input (two very different inputs give the same distribution)."""
    from scipy import stats

    bits, trials = 16, 4000
    low = np.full(1, 3, dtype=np.uint64)
    high = np.full(1, 60000, dtype=np.uint64)
    modulus = np.uint64(1 << bits)
    samples = {}
    for name, value in (("low", low), ("high", high)):
        samples[name] = np.array([int((value + secagg.expand(secagg.self_mask_key(secagg.new_secret(), b'r'), 1, bits))[0] % modulus) for _ in range(trials)])
    for values in samples.values():
        counts = np.bincount(values >> 8, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
    inputs = np.concatenate([np.full(trials, 3), np.full(trials, 60000)])
    outputs = np.concatenate([samples["low"], samples["high"]])
    assert abs(np.corrcoef(inputs, outputs)[0, 1]) < 0.06
    assert stats.ks_2samp(samples["low"], samples["high"]).pvalue > 1e-4


@settings(max_examples=40, deadline=None)
@given(holders=st.integers(1, 30), data=st.data())
def test_any_threshold_of_shares_recovers_the_seed_and_fewer_do_not(holders, data):
    threshold = data.draw(st.integers(1, holders))
    seed = secagg.new_secret()
    shares = secagg.split_secret(seed, threshold, holders)
    chosen = data.draw(st.permutations(shares))[:threshold]
    assert secagg.combine_secret(chosen, threshold) == seed
    if threshold > 1:
        with pytest.raises(ValueError, match="needed"):
            secagg.combine_secret(chosen[:-1], threshold)
        # A coalition below the threshold, interpolating anyway, learns a value unrelated to the seed.
        below = [(s[0], s[1:]) for s in chosen[:-1]]
        from Cryptodome.Protocol.SecretSharing import Shamir

        assert Shamir.combine(below) != seed


def test_masks_are_deterministic_per_secret_and_derive_from_128_bit_secrets():
    secret = secagg.new_secret()
    assert len(secret) * 8 == 128
    key = secagg.self_mask_key(secret, b"round-1")
    assert len(key) * 8 == 256
    assert (secagg.expand(key, 100, 20) == secagg.expand(key, 100, 20)).all()
    assert not (secagg.expand(key, 100, 20) == secagg.expand(secagg.self_mask_key(secret, b"round-2"), 100, 20)).all()
    assert not (secagg.expand(key, 100, 20) == secagg.expand(secagg.self_mask_key(secagg.new_secret(), b"round-1"), 100, 20)).all()
    assert secagg.expand(key, 100, 20).max() < 1 << 20
    with pytest.raises(ValueError, match="32 bytes"):
        secagg.expand(b"\x00" * 4, 10, 16)  # a 32-bit seed (Flower's SecAgg+ flaw) is refused
    for short in (b"\x00" * 4, b"\x00" * 8):
        with pytest.raises(ValueError, match="128 bits"):
            secagg.self_mask_key(short, b"r")
        with pytest.raises(ValueError, match="128 bits"):
            secagg.split_secret(short, 2, 3)


def test_sealed_shares_are_authenticated():
    key = secagg.agree(secagg.generate_key(), secagg.public_bytes(secagg.generate_key()), b"seal")
    sealed = secagg.seal(key, b"share", b"from 1 to 2, round 3")
    assert secagg.open_sealed(key, sealed, b"from 1 to 2, round 3") == b"share"
    with pytest.raises(ValueError, match="altered"):
        secagg.open_sealed(key, sealed, b"from 1 to 3, round 3")
    with pytest.raises(ValueError, match="altered"):
        secagg.open_sealed(key, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"from 1 to 2, round 3")


def test_low_order_and_malformed_public_keys_are_not_usable():
    low_order = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
    for key in (bytes(32), b"\x01" + bytes(31), low_order, b"short", b""):
        assert not secagg.is_usable_public(key)
    assert secagg.is_usable_public(secagg.public_bytes(secagg.generate_key()))
