"""Building blocks of secure aggregation (SecAgg+: Bell et al. 2020, after Bonawitz et al. 2017),
composed from vetted primitives only, no Flower, no torch:

- X25519 key agreement + HKDF-SHA256 (pyca/cryptography): a 256-bit secret per pair of clients,
  bound to the run and round by the HKDF ``info``;
- ChaCha20 (pyca/cryptography) as the pseudorandom generator that expands a 256-bit seed into
  a mask of any length (the keystream of a fixed nonce: each seed is used for one mask only);
- AES-256-GCM to send Shamir shares to another client through the server, authenticated;
- Shamir secret sharing over GF(2^128) (pycryptodome), applied to each 128-bit half of a seed.

Masks live in the integers modulo ``2**bits``: a masked input is ``u + mask (mod 2**bits)``,
pairwise masks cancel in the sum, and what is left is the sum of the fixed-point encodings
(crypto.fixedpoint), which must fit in ``bits``.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SEED_BYTES = 32  # 256-bit secrets: every mask derives from one
INFO = b"fedlearn-secagg/v1/"


def generate_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: X25519PrivateKey, peer_public: bytes, context: bytes) -> bytes:
    """The 256-bit secret two clients share, bound to ``context`` (run id, round, purpose)."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
    except ValueError:
        raise ValueError(f"not an X25519 public key ({len(peer_public)} bytes, 32 expected)") from None
    shared = private.exchange(peer)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=INFO + context).derive(shared)


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def mask_dtype(bits: int) -> np.dtype:
    """The narrowest unsigned integer type that holds ``bits``: masked values travel in it, and
    its wrap-around arithmetic is arithmetic mod 2**width, a multiple of 2**bits."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits={bits}: must be between 1 and 64")
    return np.dtype(next(f"uint{w}" for w in (8, 16, 32, 64) if bits <= w))


def reduce(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` mod 2**bits, in the type that carries them."""
    dtype = mask_dtype(bits)
    values = np.asarray(values).astype(dtype, copy=False)
    return values if bits == 8 * dtype.itemsize else values & dtype.type((1 << bits) - 1)


def expand(seed: bytes, count: int, bits: int) -> np.ndarray:
    """``count`` pseudorandom integers in [0, 2**bits) from a 256-bit seed (ChaCha20 keystream),
    as ``mask_dtype(bits)``: 16-bit masks cost 2 bytes of keystream each, not 8."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seeds are {SEED_BYTES} bytes, got {len(seed)}")
    dtype = mask_dtype(bits).newbyteorder("<")
    keystream = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor().update(bytes(dtype.itemsize * count))
    return reduce(np.frombuffer(keystream, dtype=dtype), bits)


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shares of a 256-bit secret for holders 1..holders; any ``threshold`` of them recover it."""
    if len(secret) != SEED_BYTES:
        raise ValueError(f"secrets are {SEED_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= holders:
        raise ValueError(f"threshold {threshold} must be between 1 and the {holders} holders")
    if holders > 255:
        raise ValueError(f"{holders} holders: at most 255 share one secret (use a SecAgg+ neighbourhood)")
    low, high = Shamir.split(threshold, holders, secret[:16]), Shamir.split(threshold, holders, secret[16:])
    return [struct.pack(">B", i) + a + b for (i, a), (_, b) in zip(low, high)]


def combine_secret(shares: list[bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` distinct shares (fewer raise: Shamir alone would
    silently return a wrong value)."""
    parsed = {}
    for share in shares:
        if len(share) != 33:
            raise ValueError(f"a share is 33 bytes, got {len(share)}")
        parsed[share[0]] = (share[1:17], share[17:])
    if len(parsed) < threshold:
        raise ValueError(f"{len(parsed)} distinct shares, {threshold} needed to recover the secret")
    chosen = list(parsed.items())[:threshold]
    low = Shamir.combine([(i, a) for i, (a, _) in chosen])
    high = Shamir.combine([(i, b) for i, (_, b) in chosen])
    return low + high


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM with a random nonce; ``associated`` (sender, receiver, round) is authenticated."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], associated)
    except (InvalidTag, ValueError):
        raise ValueError("sealed data was altered, or sealed for someone else") from None
