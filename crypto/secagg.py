"""Building blocks of secure aggregation (SecAgg+: Bell et al. 2020, after Bonawitz et al. 2017),
composed from vetted primitives only, no Flower, no torch:

- X25519 key agreement + HKDF-SHA256 (pyca/cryptography): a 256-bit secret per pair of clients,
  bound to the run and round by the HKDF ``info``;
- ChaCha20 (pyca/cryptography) as the pseudorandom generator that expands a 256-bit seed into
  a mask of any length (the keystream of a fixed nonce: each seed is used for one mask only);
- AES-256-GCM to send Shamir shares to another client through the server, authenticated;
- Shamir secret sharing over GF(2^128) (pycryptodomex) of 128-bit secrets: a client's self-mask
  secret and the secret its mask key derives from (HKDF), so each takes one sharing, not two.

Masks live in the integers modulo ``2**bits``: a masked input is ``u + mask (mod 2**bits)``,
pairwise masks cancel in the sum, and what is left is the sum of the fixed-point encodings
(crypto.fixedpoint), which must fit in ``bits``.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from Cryptodome.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_BYTES = 32  # 256-bit keys: what HKDF gives and ChaCha20 takes
SECRET_BYTES = 16  # 128-bit secrets: what clients Shamir-share; every mask derives from one
SHARE_BYTES = 1 + SECRET_BYTES  # a Shamir share: the holder's index and the share
NONCE_BYTES, TAG_BYTES = 12, 16  # AES-GCM


def sealed_size(plaintext_bytes: int) -> int:
    """Exact size of ``seal`` of that many bytes: a receiver (and the relaying server) can refuse
    any other before trying to open it."""
    return NONCE_BYTES + plaintext_bytes + TAG_BYTES
SHARE_BYTES = 1 + SECRET_BYTES  # holder index, then the share
INFO = b"fedlearn-secagg/v1/"


def generate_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def is_usable_public(key: bytes) -> bool:
    """A 32-byte X25519 public key that agreement can use: not a low-order point, with which
    every exchange gives the all-zero secret (RFC 7748 section 6.1) and the library refuses."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key))
    except (ValueError, TypeError):
        return False
    return True


def agree(private: X25519PrivateKey, peer_public: bytes, context: bytes) -> bytes:
    """The 256-bit secret two clients share, bound to ``context`` (run id, round, purpose)."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
    except ValueError:
        raise ValueError(f"not an X25519 public key ({len(peer_public)} bytes, 32 expected)") from None
    return _hkdf(private.exchange(peer), b"pair/" + context)


def _hkdf(material: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=INFO + info).derive(material)


def new_secret() -> bytes:
    return os.urandom(SECRET_BYTES)


def _check_secret(secret: bytes) -> None:
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"shared secrets are {SECRET_BYTES} bytes (128 bits), got {len(secret)}")


def self_mask_key(secret: bytes, context: bytes) -> bytes:
    """The 256-bit mask key a client's 128-bit self-mask secret stands for in one round."""
    _check_secret(secret)
    return _hkdf(secret, b"self-mask/" + context)


def mask_private_key(secret: bytes, context: bytes) -> X25519PrivateKey:
    """The X25519 key for pairwise masks, derived from a 128-bit secret so that the secret (not
    the key) is what gets shared: one Shamir sharing instead of two halves of a 256-bit key."""
    _check_secret(secret)
    return X25519PrivateKey.from_private_bytes(_hkdf(secret, b"mask-key/" + context))


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
    """``count`` pseudorandom integers in [0, 2**bits) from a 256-bit key (ChaCha20 keystream),
    as ``mask_dtype(bits)``: 16-bit masks cost 2 bytes of keystream each, not 8."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"mask keys are {KEY_BYTES} bytes, got {len(seed)}")
    dtype = mask_dtype(bits).newbyteorder("<")
    keystream = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor().update(bytes(dtype.itemsize * count))
    return reduce(np.frombuffer(keystream, dtype=dtype), bits)


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shares of a 128-bit secret for holders 1..holders; any ``threshold`` of them recover it."""
    _check_secret(secret)
    if not 1 <= threshold <= holders:
        raise ValueError(f"threshold {threshold} must be between 1 and the {holders} holders")
    if holders > 255:
        raise ValueError(f"{holders} holders: at most 255 share one secret (use a SecAgg+ neighbourhood)")
    return [struct.pack(">B", i) + share for i, share in Shamir.split(threshold, holders, secret)]


def combine_secret(shares: list[bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` distinct shares (fewer raise: Shamir alone would
    silently return a wrong value)."""
    parsed = {}
    for share in shares:
        if len(share) != SHARE_BYTES:
            raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(share)}")
        parsed[share[0]] = share[1:]
    if len(parsed) < threshold:
        raise ValueError(f"{len(parsed)} distinct shares, {threshold} needed to recover the secret")
    return Shamir.combine(list(parsed.items())[:threshold])


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM with a random nonce; ``associated`` (sender, receiver, round) is authenticated."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except (InvalidTag, ValueError):
        raise ValueError("sealed data was altered, or sealed for someone else") from None
