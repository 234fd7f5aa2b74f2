"""Ed25519 identities: generate, store, load, fingerprint, sign and verify.

A thin layer over pyca/cryptography. Private keys are unencrypted PKCS#8 PEM files with mode
0600 (protect them as you would an SSH key); public keys are SubjectPublicKeyInfo PEM files, or
the 32 raw bytes in base64 where they sit inside a policy file. A fingerprint is the SHA-256 of
the raw public key in hex: it names a key in policies, audit records and messages.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.digest import sha256_hex
from crypto.files import write_new

_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class KeyFileError(ValueError):
    """A key file or encoded key that cannot be used; the message says which and why."""


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def derived(seed: bytes, label: str) -> Ed25519PrivateKey:
    """The Ed25519 key that ``label`` names under ``seed``: HKDF-SHA256 of the seed, with the
    label as its info, is the 32-byte private key. Whoever holds the seed holds every such key:
    for simulated federations, whose nodes all run on one machine anyway."""
    if len(seed) < 32:
        raise KeyFileError(f"a key seed needs at least 32 bytes, this one has {len(seed)}")
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedlearn-derived-key-v1/" + label.encode()).derive(seed)
    return Ed25519PrivateKey.from_private_bytes(raw)


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(*_RAW)


def public_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(public_raw(key)).decode()


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return sha256_hex(public_raw(key))


def public_from_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError("not base64: expected the 32-byte Ed25519 public key in base64") from None
    if len(raw) != 32:
        raise KeyFileError(f"an Ed25519 public key has 32 bytes, this one has {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def write_keypair(directory: Path, name: str) -> tuple[Path, Path, Ed25519PrivateKey]:
    """Write ``name.key`` (0600) and ``name.pub`` in ``directory``; never overwrite a key."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists: choose another --name or move the old key away")
    key = generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_new(private_path, pem, private=True)
    write_public(key, public_path)
    return private_path, public_path, key


def write_public(key: Ed25519PrivateKey | Ed25519PublicKey, path: Path) -> None:
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    Path(path).write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def load_private(path: Path) -> Ed25519PrivateKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key: create one with `fedlearn keys generate`")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    """A ``.pub`` PEM file, or a file holding the base64 raw key."""
    data = _read(path, "public key")
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{path} is a private key: give the matching .pub file")
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise KeyFileError(f"{path} is not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
        return key
    try:
        return public_from_b64(data.decode("ascii", errors="replace"))
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    return key.sign(message)


def verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} file {path} does not exist (create keys with `fedlearn keys generate`)") from None
    except IsADirectoryError:
        raise KeyFileError(f"{what} path {path} is a directory, not a key file") from None
