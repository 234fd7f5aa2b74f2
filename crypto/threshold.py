"""Threshold BFV with OpenFHE: encrypt under a joint public key, add ciphertexts, decrypt only
with a partial decryption from every key holder, where a quorum may stand in for missing ones.

OpenFHE's multiparty BFV (ring 4096, one 60-bit modulus, BV key switching, plaintext modulus
998244353 < 2**30, FIXED_NOISE_MULTIPARTY) gives n-of-n decryption: each of the n committee
members holds one additive share of the secret key, made in a chain (member i extends member
i-1's public key, ``MultipartyKeyGen``); the last public key is the joint one; fusion needs one
partial decryption per share, and fewer shares decrypt to noise. Values are integers (the
fixed-point encodings of crypto.fixedpoint), one per slot, and sums are exact while they stay
below ``2**SUM_BITS``: 16.2 bytes per value, half of threshold CKKS at the same ring (32.5) for
fixed-point precision at least as fine, and a fused result with no decryption noise in it.

OpenFHE's own Shamir resharing (``ShareKeys`` / ``RecoverSharedKey``) is not in its Python
bindings, so t-of-n comes from composing vetted primitives the way Krawczyk's "secret sharing
made short" does: each member seals its key share with AES-128-GCM under a fresh key and
Shamir-splits that 128-bit key t-of-n (PyCryptodome, as secure aggregation does), one share per
member. Any t members can open a missing member's key share and decrypt in its place; t-1 hold
t-1 Shamir shares, which say nothing about the AES key, and AES-GCM refuses to open with a wrong
one. Below t every path fails loudly: too few shares, too few partials.

Partial decryptions carry OpenFHE's fixed smudging noise (FIXED_NOISE_MULTIPARTY, 20-bit
standard deviation), not statistical noise flooding (NOISE_FLOODING_MULTIPARTY, which needs ring
8192 and a 180-bit modulus: 48 bytes per value): a partial decryption is an RLWE sample of its
member's key share with that noise, which is computational, not statistical, hiding. The README's
threat model says what that means.

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
SLOTS = RING_DIMENSION  # BFV packs one integer per ring coefficient
PLAINTEXT_MODULUS = 998244353  # prime, = 1 mod 2 * RING_DIMENSION (packing needs it), < 2**30
SUM_BITS = 29  # a sum below 2**29 < PLAINTEXT_MODULUS decrypts exactly
MODULUS_BITS = 60
BACKUP_KEY_BYTES = 16  # AES-128-GCM: a key is one 128-bit Shamir secret
# Size limits checked before OpenFHE parses a blob from the network: a context is ~515 bytes; a
# ciphertext or public key two polynomials of RING_DIMENSION 64-bit coefficients (one tower),
# a secret key or partial decryption one, each with a header of well under 4 KiB.
MAX_CONTEXT_BYTES = 4096
MAX_BLOB_BYTES = 2 * RING_DIMENSION * 8 + 4096


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
            "or build one for your Python (docs/privacy.md: Threshold HE, building OpenFHE)"
        ) from exc
    return module


def new_context() -> bytes:
    """Fresh BFV parameters for a run (515 bytes): every party deserializes the same blob."""
    of = openfhe()
    params = of.CCParamsBFVRNS()
    params.SetPlaintextModulus(PLAINTEXT_MODULUS)
    params.SetMultiplicativeDepth(0)
    params.SetScalingModSize(MODULUS_BITS)
    params.SetKeySwitchTechnique(of.BV)
    params.SetRingDim(RING_DIMENSION)
    params.SetSecurityLevel(of.HEStd_128_classic)
    params.SetMultipartyMode(of.FIXED_NOISE_MULTIPARTY)
    context = of.GenCryptoContext(params)
    for feature in (of.PKE, of.KEYSWITCH, of.LEVELEDSHE, of.MULTIPARTY):
        context.Enable(feature)
    return of.Serialize(context, of.BINARY)


def _context(blob: bytes):
    if len(blob) > MAX_CONTEXT_BYTES:
        raise ThresholdError(f"a crypto context of {len(blob)} bytes, more than the {MAX_CONTEXT_BYTES} one can take: refused unread")
    return _parsed_context(blob)


@functools.lru_cache(maxsize=8)
def _parsed_context(blob: bytes):
    of = openfhe()
    try:
        context = of.DeserializeCryptoContextString(blob, of.BINARY)
    except Exception as exc:  # OpenFHE raises RuntimeError with its own text
        raise ThresholdError(f"not an OpenFHE crypto context ({exc})") from None
    if context.GetRingDimension() != RING_DIMENSION or context.GetPlaintextModulus() != PLAINTEXT_MODULUS:
        raise ThresholdError(f"a crypto context of ring dimension {context.GetRingDimension()} and plaintext modulus "
                             f"{context.GetPlaintextModulus()}, not fedlearn's {RING_DIMENSION} and {PLAINTEXT_MODULUS}")
    return context


def _load(kind: str, blob: bytes):
    of = openfhe()
    loader = {"public key": of.DeserializePublicKeyString, "secret key": of.DeserializePrivateKeyString,
              "ciphertext": of.DeserializeCiphertextString}[kind]
    if len(blob) > MAX_BLOB_BYTES:
        raise ThresholdError(f"a serialized {kind} of {len(blob)} bytes, more than the {MAX_BLOB_BYTES} one can take: refused unread")
    try:
        loaded = loader(blob, of.BINARY)
    except Exception as exc:
        raise ThresholdError(f"this is not a serialized OpenFHE {kind} ({str(exc)[:120]})") from None
    if loaded is None:  # some malformed blobs deserialize to nothing rather than raise
        raise ThresholdError(f"this is not a serialized OpenFHE {kind} (it deserializes to nothing)")
    return loaded


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


def ciphertexts_for(length: int) -> int:
    """How many ciphertexts carry ``length`` values."""
    return max(1, -(-length // SLOTS))


def encrypt(context: bytes, joint_public: bytes, values: np.ndarray) -> list[bytes]:
    """``values`` (1-D integers in [0, 2**SUM_BITS)) in ciphertexts of SLOTS values each, under
    the joint public key."""
    cc, key = _context(context), _load("public key", joint_public)
    flat = np.asarray(values).ravel()
    if flat.size and (flat.dtype.kind not in "iu" or int(flat.min()) < 0 or int(flat.max()) >= 1 << SUM_BITS):
        raise ThresholdError(f"threshold BFV encrypts integers in [0, 2**{SUM_BITS}): encode values with crypto.fixedpoint first")
    flat = flat.astype(np.int64)
    return [_dump(cc.Encrypt(key, cc.MakePackedPlaintext(flat[i : i + SLOTS].tolist())))
            for i in range(0, ciphertexts_for(len(flat)) * SLOTS, SLOTS)]


def check_ciphertexts(context: bytes, blobs: Sequence[bytes], length: int) -> None:
    """Raise ThresholdError unless ``blobs`` are the ciphertexts of ``length`` values under
    this context (the server checks every reply before adding any)."""
    expected = ciphertexts_for(length)
    if len(blobs) != expected:
        raise ThresholdError(f"{len(blobs)} ciphertexts, {expected} expected for {length} values")
    cc = _context(context)
    for blob in blobs:
        ciphertext = _load("ciphertext", blob)
        if ciphertext.GetCryptoContext().GetRingDimension() != cc.GetRingDimension():
            raise ThresholdError("a ciphertext of another ring dimension than this run's")


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
    """The plaintext sum (integers mod PLAINTEXT_MODULUS) from one partial decryption list per
    member (all ``members`` of them: with fewer, OpenFHE would return noise without complaint,
    so that is refused here)."""
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
        out.append(np.mod(np.asarray(plaintext.GetPackedValue(), dtype=np.int64), PLAINTEXT_MODULUS))
    return np.concatenate(out)[:length] if out else np.zeros(0, dtype=np.int64)


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


# -- a committee member's side of the ceremony and of decryption ---------------------------
def _pair_context(ceremony: str, sender: int, receiver: int) -> bytes:
    return f"fedlearn-threshold/{ceremony}/{sender}->{receiver}".encode()


@dataclass
class CommitteeMember:
    """One key holder between the messages of a run: its X25519 key (to receive Shamir shares
    sealed by other members), its key share, and the Shamir shares it holds of theirs.

    It reveals Shamir shares for at most ``members - quorum`` distinct missing members in a run:
    a server that recovered more key shares could, with ``quorum - 1`` colluding members, hold
    every share. Its state is bytes and integers only (``to_state`` / ``from_state``), so a
    Flower node can keep it in its private context."""

    ceremony: str
    agreement: bytes  # X25519 private key, raw
    member: int = -1  # -1 until the server assigns a place in the committee (make_key)
    members: int = 0
    quorum: int = 0
    share: KeyShare | None = None
    held: dict[int, bytes] | None = None  # member -> my Shamir share of its sealing key
    revealed: tuple[int, ...] = ()  # members whose shares I revealed so far

    @classmethod
    def join(cls, ceremony: str) -> CommitteeMember:
        """A candidate with a fresh X25519 key, before the committee is chosen."""
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        return cls(ceremony, secagg.generate_key().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    def _private(self):
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return X25519PrivateKey.from_private_bytes(self.agreement)

    def public_agreement_key(self) -> bytes:
        return secagg.public_bytes(self._private())

    def _pair_key(self, peer_public: bytes, sender: int, receiver: int) -> bytes:
        return secagg.agree(self._private(), peer_public, _pair_context(self.ceremony, sender, receiver))

    def make_key(self, context: bytes, member: int, quorum: int, previous_public: bytes | None,
                 peers: Sequence[bytes]) -> tuple[bytes, bytes, list[bytes]]:
        """My key share as member ``member`` of a committee of ``len(peers)`` (extending
        ``previous_public``), and what the server relays: the chain's public key after me, my
        key share sealed for the committee, and one Shamir share of its sealing key for each
        other member, sealed for that member (empty for myself)."""
        members = len(peers)
        if not 2 <= quorum <= members:
            raise ThresholdError(f"quorum {quorum} of {members}: must be between 2 and the committee size (1 would let one member decrypt)")
        if not 0 <= member < members:
            raise ThresholdError(f"member {member}: a committee of {members} numbers its members 0..{members - 1}")
        if peers[member] != self.public_agreement_key():
            raise ThresholdError(f"the committee lists another agreement key as member {member}'s than this node's")
        if self.share is not None:
            raise ThresholdError(f"this node already holds the key share of member {self.member} in ceremony {self.ceremony}")
        self.member, self.members, self.quorum = member, members, quorum
        self.share = make_share(context, self.member, previous_public)
        backup = back_up(self.share, self.members, self.quorum)
        sealed = [
            b"" if j == self.member else
            secagg.seal(self._pair_key(peers[j], self.member, j), backup.shares[j], _pair_context(self.ceremony, self.member, j))
            for j in range(self.members)
        ]
        return self.share.public, backup.sealed, sealed

    def hold(self, sealed_for_me: Mapping[int, bytes], peers: Sequence[bytes]) -> None:
        """Open the Shamir shares every other member sealed for me; keep them to reveal later."""
        others = set(range(self.members)) - {self.member}
        if set(sealed_for_me) != others:
            raise ThresholdError(f"shares from members {sorted(sealed_for_me)}, expected from {sorted(others)}")
        held = {}
        for sender, blob in sealed_for_me.items():
            context = _pair_context(self.ceremony, sender, self.member)
            try:
                held[sender] = secagg.open_sealed(self._pair_key(peers[sender], sender, self.member), blob, context)
            except ValueError:
                raise ThresholdError(f"the share sealed by member {sender} did not open: altered, or sealed for another member") from None
        self.held = held

    def partial_decrypt(self, context: bytes, ciphertexts: Sequence[bytes]) -> list[bytes]:
        if self.share is None:
            raise ThresholdError(f"member {self.member} has no key share: the key ceremony did not reach it")
        return partial_decrypt(context, self.share, ciphertexts)

    def reveal(self, missing: Sequence[int]) -> dict[int, bytes]:
        """My Shamir shares of the missing members' sealing keys, within the cap (see the class)."""
        missing = sorted(set(missing))
        if self.held is None:
            raise ThresholdError(f"member {self.member} holds no shares: the key ceremony did not finish")
        if self.member in missing:
            raise ThresholdError(f"member {self.member} was asked to reveal its own share's backup while it answers")
        unknown = [m for m in missing if m not in self.held]
        if unknown:
            raise ThresholdError(f"no committee member {unknown}: members are 0..{self.members - 1}")
        after = sorted(set(self.revealed) | set(missing))
        if len(after) > self.members - self.quorum:
            raise ThresholdError(
                f"revealing for members {missing} would make {len(after)} recovered key shares, more than the "
                f"{self.members - self.quorum} (committee {self.members} - quorum {self.quorum}) a run may lose: with "
                f"{self.quorum - 1} colluding members the server would then hold every share. Refused"
            )
        self.revealed = tuple(after)
        return {m: self.held[m] for m in missing}

    def to_state(self) -> dict:
        state = {"ceremony": self.ceremony, "agreement": self.agreement, "member": self.member,
                 "members": self.members, "quorum": self.quorum, "revealed": list(self.revealed)}
        if self.share is not None:
            state.update({"secret": self.share.secret, "public": self.share.public})
        if self.held is not None:
            state.update({"held-from": sorted(self.held), "held": [self.held[m] for m in sorted(self.held)]})
        return state

    @classmethod
    def from_state(cls, state: Mapping) -> CommitteeMember:
        member = int(state["member"])
        share = KeyShare(member, bytes(state["secret"]), bytes(state["public"])) if "secret" in state else None
        held = ({int(m): bytes(s) for m, s in zip(state["held-from"], state["held"], strict=True)}
                if "held-from" in state else None)
        return cls(str(state["ceremony"]), bytes(state["agreement"]), member, int(state["members"]), int(state["quorum"]),
                   share, held, tuple(int(m) for m in state["revealed"]))
