"""Threshold CKKS with OpenFHE: encrypt under a joint public key, add ciphertexts, decrypt only
with a partial decryption from every key holder, where a quorum may stand in for missing ones.

OpenFHE's multiparty CKKS (ring 4096, depth 0, BV key switching, FIXEDMANUAL, scale 2^50) gives
n-of-n decryption: each of the n committee members holds one additive share of the secret key,
made in a chain (member i extends member i-1's public key, ``MultipartyKeyGen``); the last
public key is the joint one; fusion needs one partial decryption per share, and fewer shares
decrypt to noise. OpenFHE's own Shamir resharing (``ShareKeys`` / ``RecoverSharedKey``) is not
in its Python bindings, so t-of-n comes from composing vetted primitives the way Krawczyk's
"secret sharing made short" does: each member seals its key share with AES-128-GCM under a fresh
key and Shamir-splits that 128-bit key t-of-n (PyCryptodome, as secure aggregation does), one
share per member. Any t members can open a missing member's key share and decrypt in its place;
t-1 hold t-1 Shamir shares, which say nothing about the AES key, and AES-GCM refuses to open
with a wrong one. Below t every path fails loudly: too few shares, too few partials.

Open question before this backs a privacy mode: partial decryptions carry OpenFHE's default
fixed decryption noise (NoiseFlooding::MP_SD), not statistical noise flooding (CKKS's
NOISE_FLOODING_DECRYPT, BFV's NOISE_FLOODING_MULTIPARTY, which needs a larger ring); which one
the he-threshold mode uses, and what its threat model then claims, is still to be decided.

Everything crosses this module's boundary as bytes (OpenFHE's BINARY serialization), so the
Flower layer only moves blobs. ``openfhe`` is an optional dependency (``fedlearn[threshold]``),
imported on first use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from crypto import secagg

RING_DIMENSION = 4096
SLOTS = RING_DIMENSION // 2
SCALE_BITS = 50
FIRST_MODULUS_BITS = 60
BACKUP_KEY_BYTES = 16  # AES-128-GCM: a key is one 128-bit Shamir secret


class ThresholdError(ValueError):
    """Too few key holders, partials or shares, or key material that does not fit."""


def openfhe():
    """The openfhe module, or an error that says how to get it."""
    try:
        import openfhe as module
    except ImportError as exc:
        raise ImportError(
            "privacy=he-threshold needs OpenFHE's Python bindings (openfhe): install fedlearn[threshold] with "
            "`pip install -e '.[threshold]'` where a wheel fits (PyPI's openfhe imports on Python 3.10), "
            "or build one for your Python (README: Threshold HE, building OpenFHE)"
        ) from exc
    return module


def new_context() -> bytes:
    """Fresh CKKS parameters for a run: every party deserializes the same blob."""
    of = openfhe()
    params = of.CCParamsCKKSRNS()
    params.SetMultiplicativeDepth(0)
    params.SetFirstModSize(FIRST_MODULUS_BITS)
    params.SetScalingModSize(SCALE_BITS)
    params.SetScalingTechnique(of.FIXEDMANUAL)
    params.SetKeySwitchTechnique(of.BV)
    params.SetRingDim(RING_DIMENSION)
    params.SetSecurityLevel(of.HEStd_128_classic)
    context = of.GenCryptoContext(params)
    for feature in (of.PKE, of.KEYSWITCH, of.LEVELEDSHE, of.MULTIPARTY):
        context.Enable(feature)
    return of.Serialize(context, of.BINARY)


@functools.lru_cache(maxsize=8)
def _context(blob: bytes):
    of = openfhe()
    try:
        return of.DeserializeCryptoContextString(blob, of.BINARY)
    except Exception as exc:  # OpenFHE raises RuntimeError with its own text
        raise ThresholdError(f"not an OpenFHE crypto context ({exc})") from None


def _load(kind: str, blob: bytes):
    of = openfhe()
    loader = {"public key": of.DeserializePublicKeyString, "secret key": of.DeserializePrivateKeyString,
              "ciphertext": of.DeserializeCiphertextString}[kind]
    try:
        return loader(blob, of.BINARY)
    except Exception as exc:
        raise ThresholdError(f"this is not a serialized OpenFHE {kind} ({str(exc)[:120]})") from None


def _dump(obj) -> bytes:
    of = openfhe()
    return of.Serialize(obj, of.BINARY)


@dataclass(frozen=True)
class KeyShare:
    """One committee member's share of the decryption key and its place in the chain."""

    member: int  # 0..n-1; member 0 made the chain's first key and decrypts as the "lead"
    secret: bytes
    public: bytes  # the chain's public key after this member: the joint key for the last one


def make_share(context: bytes, member: int, previous_public: bytes | None) -> KeyShare:
    """Member ``member``'s key share: a fresh key pair for member 0, else one that extends the
    previous member's public key (OpenFHE's MultipartyKeyGen)."""
    cc = _context(context)
    if (member == 0) != (previous_public is None):
        raise ThresholdError(f"member {member}: the first member starts the chain, every other extends the previous public key")
    pair = cc.KeyGen() if previous_public is None else cc.MultipartyKeyGen(_load("public key", previous_public))
    if not pair.good():
        raise ThresholdError(f"OpenFHE could not make member {member}'s key pair")
    return KeyShare(member, _dump(pair.secretKey), _dump(pair.publicKey))


def encrypt(context: bytes, joint_public: bytes, values: np.ndarray) -> list[bytes]:
    """``values`` (1-D) in ciphertexts of SLOTS values each, under the joint public key."""
    cc, key = _context(context), _load("public key", joint_public)
    flat = np.asarray(values, dtype=np.float64).ravel()
    return [_dump(cc.Encrypt(key, cc.MakeCKKSPackedPlaintext(flat[i : i + SLOTS].tolist())))
            for i in range(0, max(len(flat), 1), SLOTS)]


def add(context: bytes, contributions: Sequence[Sequence[bytes]]) -> list[bytes]:
    """The element-wise sum of several clients' ciphertext lists (no key needed)."""
    if not contributions:
        raise ThresholdError("no contributions to add")
    lengths = {len(c) for c in contributions}
    if len(lengths) != 1:
        raise ThresholdError(f"contributions have different numbers of ciphertexts: {sorted(lengths)}")
    cc = _context(context)
    total = [_load("ciphertext", blob) for blob in contributions[0]]
    for contribution in contributions[1:]:
        total = [cc.EvalAdd(acc, _load("ciphertext", blob)) for acc, blob in zip(total, contribution)]
    return [_dump(ct) for ct in total]


def partial_decrypt(context: bytes, share: KeyShare, ciphertexts: Sequence[bytes]) -> list[bytes]:
    """This member's partial decryptions: useless alone, fused with every other member's."""
    cc, secret = _context(context), _load("secret key", share.secret)
    loaded = [_load("ciphertext", blob) for blob in ciphertexts]
    step = cc.MultipartyDecryptLead if share.member == 0 else cc.MultipartyDecryptMain
    return [_dump(part) for part in step(loaded, secret)]


def fuse(context: bytes, partials: Mapping[int, Sequence[bytes]], members: int, length: int) -> np.ndarray:
    """The plaintext sum from one partial decryption list per member (all ``members`` of them:
    with fewer, OpenFHE would return noise without complaint, so that is refused here)."""
    missing = sorted(set(range(members)) - set(partials))
    if missing:
        raise ThresholdError(
            f"partial decryptions from {len(partials)} of {members} key holders (missing {missing}): every share "
            "must take part; a quorum can recover a missing member's share (recover_share)"
        )
    counts = {len(p) for p in partials.values()}
    if len(counts) != 1:
        raise ThresholdError(f"members sent different numbers of partial decryptions: {sorted(counts)}")
    cc = _context(context)
    out = []
    for i in range(counts.pop()):
        plaintext = cc.MultipartyDecryptFusion([_load("ciphertext", partials[m][i]) for m in range(members)])
        plaintext.SetLength(SLOTS)
        out.append(np.asarray(plaintext.GetRealPackedValue(), dtype=np.float64))
    return np.concatenate(out)[:length] if out else np.zeros(0)


@dataclass(frozen=True)
class ShareBackup:
    """A member's key share sealed for the committee, and the Shamir shares of the sealing key
    (``shares[j]`` goes to member j, which must keep it from everyone else)."""

    member: int
    sealed: bytes
    shares: dict[int, bytes]


def _associated(member: int) -> bytes:
    return f"fedlearn threshold key share of member {member}".encode()


def back_up(share: KeyShare, members: int, threshold: int) -> ShareBackup:
    """Seal ``share`` under a fresh AES-128-GCM key split ``threshold``-of-``members``."""
    if not 1 <= threshold <= members:
        raise ThresholdError(f"quorum {threshold} must be between 1 and the committee's {members} members")
    key = os.urandom(BACKUP_KEY_BYTES)
    sealed = secagg.seal(key, share.secret + share.public, _associated(share.member))
    shares = secagg.split_secret(key, threshold, members)
    return ShareBackup(share.member, sealed + len(share.secret).to_bytes(4, "big"), dict(enumerate(shares)))


def recover_share(backup_sealed: bytes, member: int, shamir_shares: Sequence[bytes], threshold: int) -> KeyShare:
    """A missing member's key share, from its sealed backup and ``threshold`` Shamir shares."""
    try:
        key = secagg.combine_secret(list(shamir_shares), threshold)
    except ValueError as exc:
        raise ThresholdError(f"cannot recover member {member}'s key share: {exc}") from None
    sealed, secret_length = backup_sealed[:-4], int.from_bytes(backup_sealed[-4:], "big")
    try:
        opened = secagg.open_sealed(key, sealed, _associated(member))
    except ValueError:
        raise ThresholdError(f"member {member}'s key share did not open: a share is wrong, or belongs to another member") from None
    return KeyShare(member, opened[:secret_length], opened[secret_length:])
