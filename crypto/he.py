"""Homomorphic sums with TenSEAL: clients encrypt, the server adds ciphertexts it cannot read.

Two schemes, both with ring degree N=4096 and coefficient modulus [60, 49] bits (109 bits, the
largest modulus the HE standard's tables allow N=4096 at 128-bit classical security). Additions
use only the first (data) prime; the second is SEAL's special prime. Clients encrypt with the
secret key (TenSEAL's symmetric mode: half the work of public-key encryption, same ciphertexts),
so the only key material is the secret key, and a server context is ~100 bytes of parameters
with no key at all: it can add, it cannot encrypt or decrypt.

- ``bfv`` (default): values are fixed-point encoded (crypto.fixedpoint) and several are packed
  into each of the 4096 slots with bit shifts. Exact integer sums, so the only error is the
  fixed-point rounding. The plaintext modulus is a batching prime whose size leaves room for
  the noise of ``max_terms`` additions: measured with TenSEAL 0.3.18, decryption stays exact while
  ``plain bits + log2(terms) <= 57``; we keep 2 bits of margin (``NOISE_LIMIT_BITS``).
- ``ckks``: approximate arithmetic on floats, 2048 slots per ciphertext, scale 2^40: no
  clipping or quantization, error ~1e-7, 4x the bytes of 16-bit bfv.

Threat model: the server (honest but curious) sees ciphertexts and the clear total weight only.
Every client holds the same secret key: a client that obtains another client's ciphertext can
decrypt it (threshold decryption removes that; see the he-threshold mode).
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from crypto.files import write_new
from crypto.fixedpoint import FixedPoint, Packing

SCHEMES = ("bfv", "ckks")
POLY_DEGREE = 4096
COEFF_BITS = (60, 49)
CKKS_SCALE_BITS = 40
NOISE_LIMIT_BITS = 55  # plaintext modulus bits + log2(number of added ciphertexts)
MAGIC = b"fedlearn-he-key 1\n"


class HEKeyError(ValueError):
    """A key file is missing, malformed, of the wrong kind or for another context."""


@dataclass(frozen=True)
class KeyInfo:
    scheme: str
    max_terms: int  # most ciphertexts one sum may add (noise budget)
    plain_modulus_bits: int  # bfv only (0 for ckks)
    context_id: str = ""  # random, shared by the secret and public files of one key pair
    secret: bool = False

    def parameters(self) -> dict:
        """What the audit log and results record about the scheme (no key material)."""
        params = {"scheme": self.scheme, "poly_modulus_degree": POLY_DEGREE, "coeff_mod_bit_sizes": list(COEFF_BITS),
                  "security_bits": 128, "max_terms": self.max_terms, "context_id": self.context_id}
        if self.scheme == "bfv":
            params["plain_modulus_bits"] = self.plain_modulus_bits
        else:
            params["scale_bits"] = CKKS_SCALE_BITS
        return params


def plain_modulus_bits(max_terms: int) -> int:
    """The largest batching plaintext modulus that ``max_terms`` additions cannot overflow with noise."""
    return min(NOISE_LIMIT_BITS - math.ceil(math.log2(max(max_terms, 1))), 59)


@dataclass
class HEKey:
    """A TenSEAL context with what fedlearn needs to know about it."""

    info: KeyInfo
    context: ts.Context = field(repr=False)

    @classmethod
    def generate(cls, scheme: str, max_terms: int) -> HEKey:
        if scheme not in SCHEMES:
            raise HEKeyError(f"HE scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
        if max_terms < 1:
            raise HEKeyError(f"max_terms={max_terms}: must be >= 1")
        symmetric = ts.ENCRYPTION_TYPE.SYMMETRIC
        if scheme == "bfv":
            bits = plain_modulus_bits(max_terms)
            if bits < 20:
                raise HEKeyError(f"{max_terms} clients per round exceed what one bfv sum can add; use fewer")
            while True:  # SEAL's 49-bit batching prime is also its 49-bit coefficient prime: skip such clashes
                try:
                    context = ts.context(ts.SCHEME_TYPE.BFV, POLY_DEGREE, _batching_prime(bits), list(COEFF_BITS), symmetric, n_threads=1)
                    break
                except ValueError:
                    if bits <= 20:
                        raise
                    bits -= 1
        else:
            bits = 0
            if max_terms > 1 << 18:
                raise HEKeyError(f"{max_terms} clients per round exceed what one ckks sum can add; use fewer")
            context = ts.context(ts.SCHEME_TYPE.CKKS, POLY_DEGREE, None, list(COEFF_BITS), symmetric, n_threads=1)
            context.global_scale = 2.0**CKKS_SCALE_BITS
        # Random, so that two key pairs with the same parameters never share an id.
        info = KeyInfo(scheme, max_terms, bits, secrets.token_hex(32), secret=True)
        return cls(info, context)

    @property
    def secret(self) -> bool:
        return self.info.secret

    @property
    def plain_modulus(self) -> int:
        return _batching_prime(self.info.plain_modulus_bits)

    def public(self) -> HEKey:
        """The same parameters without any key: what the server holds."""
        return HEKey(KeyInfo(**{**asdict(self.info), "secret": False}), ts.context_from(_keyless(self.context)))

    def to_bytes(self) -> bytes:
        body = _keyless(self.context) if not self.secret else self.context.serialize(
            save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
        )
        header = json.dumps(asdict(self.info), sort_keys=True).encode()
        return MAGIC + header + b"\n" + body

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "HE key") -> HEKey:
        if not data.startswith(MAGIC):
            raise HEKeyError(f"{source} is not a fedlearn HE key (create one with `fedlearn keys he-generate`)")
        header, _, body = data[len(MAGIC):].partition(b"\n")
        try:
            info = KeyInfo(**json.loads(header))
            context = ts.context_from(body)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise HEKeyError(f"{source} is corrupted ({exc}); generate a new key pair") from None
        if info.secret != context.has_secret_key():
            raise HEKeyError(f"{source} is corrupted: its header and its key material disagree")
        return cls(info, context)

    def save(self, path: Path) -> Path:
        """Write the key; a secret key gets mode 0600. Never overwrites an existing file."""
        try:
            return write_new(Path(path), self.to_bytes(), private=self.secret)
        except FileExistsError:
            raise HEKeyError(f"{path} already exists; remove it or choose another --out") from None

    @classmethod
    def load(cls, path: str | Path, *, secret: bool) -> HEKey:
        try:
            path = Path(path).expanduser()
            data = path.read_bytes()
        except FileNotFoundError:
            raise HEKeyError(f"HE key {path} does not exist (create keys with `fedlearn keys he-generate`)") from None
        except RuntimeError:  # pathlib cannot expand ~user
            raise HEKeyError(f"HE key {path}: no such user's home directory") from None
        key = cls.from_bytes(data, str(path))
        if key.secret != secret:
            wanted = "the secret context (he.secret) of the clients" if secret else "the public context (he.public)"
            raise HEKeyError(f"{path} is the wrong kind of HE key: this side needs {wanted}")
        return key


@functools.cache
def _batching_prime(bits: int) -> int:
    """SEAL's (deterministic) ``bits``-bit prime = 1 mod 2N, which BFV batching needs."""
    return sealapi.PlainModulus.Batching(POLY_DEGREE, bits).value()


def _keyless(context: ts.Context) -> bytes:
    return context.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)


def generate_pair(directory: Path, scheme: str, max_terms: int) -> tuple[Path, Path]:
    """``he.secret`` (clients, 0600) and ``he.public`` (server) in ``directory``."""
    key = HEKey.generate(scheme, max_terms)
    directory = Path(directory)
    return key.save(directory / "he.secret"), key.public().save(directory / "he.public")


# -- encryption workers -------------------------------------------------------------
# TenSEAL holds the GIL while it encrypts, so threads do not help: a pool of processes, each
# with its own copy of the secret context, encrypts chunks in parallel on multi-core nodes.

_POOLS: dict[tuple[str, int], object] = {}
_WORKER: dict = {}


def _encrypt_piece(context: ts.Context, scheme: str, piece: np.ndarray) -> bytes:
    vector = ts.bfv_vector if scheme == "bfv" else ts.ckks_vector
    return vector(context, piece.tolist()).serialize()


def _init_worker(key_bytes: bytes) -> None:
    key = HEKey.from_bytes(key_bytes)
    _WORKER.update(context=key.context, scheme=key.info.scheme)


def _encrypt_in_worker(piece: np.ndarray) -> bytes:
    return _encrypt_piece(_WORKER["context"], _WORKER["scheme"], piece)


def _shutdown_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].shutdown(wait=True, cancel_futures=True)


def _pool(key: HEKey, workers: int):
    """A process pool for ``key``, started once per process and reused across rounds."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    slot = (key.info.context_id, workers)
    if not _POOLS:
        atexit.register(_shutdown_pools)
    if slot not in _POOLS:
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads (Ray, Flower)
        _POOLS[slot] = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                           initargs=(key.to_bytes(),))
    return _POOLS[slot]


# -- sums ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encrypted:
    """A contribution (``terms`` = 1) or a sum of contributions, as serialized ciphertexts."""

    chunks: tuple[bytes, ...]
    weight: float  # total weight of the summed terms, in clear
    terms: int = 1
    clipped: int = 0  # values clipped into range by the encoding (bfv)


@dataclass(frozen=True)
class Layout:
    """How a vector of ``length`` values maps to ciphertexts for sums of up to ``max_terms``."""

    scheme: str
    length: int
    max_terms: int
    bits: int = 16  # bfv: fixed-point bits per value

    def encoding(self) -> FixedPoint:
        return FixedPoint(self.bits)

    def packing(self, key: HEKey) -> Packing:
        return Packing.for_sum(self.encoding(), self.max_terms, key.info.plain_modulus_bits - 1)

    def slots(self, key: HEKey) -> int:
        """Slots the vector needs: one value per slot in ckks, ``lanes`` per slot in bfv."""
        return self.length if self.scheme == "ckks" else self.packing(key).slots_for(self.length)

    def chunks(self, key: HEKey) -> int:
        return -(-self.slots(key) // slots_per_chunk(self.scheme))


def slots_per_chunk(scheme: str) -> int:
    return POLY_DEGREE if scheme == "bfv" else POLY_DEGREE // 2


class HESum:
    """The SecureSum of ``he`` (see DESIGN.md section 3): encode and decode need the secret key,
    add needs none. ``ranges`` (bfv) are the per-value clipping ranges all clients share."""

    def __init__(self, key: HEKey, layout: Layout, ranges: np.ndarray | float | None = None, workers: int = 1):
        if layout.scheme != key.info.scheme:
            raise HEKeyError(f"the run uses he-scheme={layout.scheme} but the HE key is {key.info.scheme}")
        if layout.max_terms > key.info.max_terms:
            raise HEKeyError(
                f"{layout.max_terms} clients per round, but this HE key was made for sums of at most "
                f"{key.info.max_terms}: generate keys with --max-clients {layout.max_terms} or more"
            )
        self.key, self.layout, self.workers = key, layout, workers
        self.ranges = 1.0 if ranges is None else ranges

    # client side ------------------------------------------------------------------
    def encode(self, values: np.ndarray, weight: float) -> Encrypted:
        self._need_secret("encrypt")
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size != self.layout.length:
            raise ValueError(f"update has {values.size} values, the layout expects {self.layout.length}")
        if self.layout.scheme == "ckks":
            bound = 2.0 ** (COEFF_BITS[0] - CKKS_SCALE_BITS - 1) / self.layout.max_terms
            if not np.isfinite(values).all() or np.abs(values).max(initial=0) >= bound:
                raise ValueError(f"ckks can add {self.layout.max_terms} values only below {bound:g} in magnitude (or a value is NaN/Inf)")
            if not 0.0 < weight <= 1.0:
                raise ValueError(f"weight={weight}: must be in (0, 1]")
            slots, clipped = values * weight, 0
        else:
            encoded, clipped = self.layout.encoding().encode(values, weight, self.ranges)
            packing = self.layout.packing(self.key)
            slots = packing.pack(encoded, packing.slots_for(values.size))
        return Encrypted(tuple(self._encrypt(slots)), weight, 1, clipped)

    def _encrypt(self, slots: np.ndarray) -> list[bytes]:
        size = slots_per_chunk(self.layout.scheme)
        pieces = [slots[i : i + size] for i in range(0, len(slots), size)]
        if self.workers > 1 and len(pieces) > 1:
            pool = _pool(self.key, self.workers)
            return list(pool.map(_encrypt_in_worker, pieces, chunksize=max(1, len(pieces) // (4 * self.workers))))
        return [_encrypt_piece(self.key.context, self.layout.scheme, piece) for piece in pieces]

    def decode(self, total: Encrypted) -> tuple[np.ndarray, float]:
        """The weighted sum of the encoded values and the total weight."""
        self._need_secret("decrypt")
        self.check(total, deep=False)
        if self.layout.scheme == "ckks":
            parts = [np.asarray(ts.ckks_vector_from(self.key.context, c).decrypt()) for c in total.chunks]
            return np.concatenate(parts)[: self.layout.length], total.weight
        modulus = self.key.plain_modulus
        parts = [np.asarray(ts.bfv_vector_from(self.key.context, c).decrypt(), dtype=np.int64) % modulus for c in total.chunks]
        lanes = self.layout.packing(self.key).unpack(np.concatenate(parts), self.layout.length)
        return self.layout.encoding().decode(lanes, total.terms, self.ranges), total.weight

    # server side ------------------------------------------------------------------
    def add(self, contributions: Sequence[Encrypted]) -> Encrypted:
        """The sum of ``contributions``, computed on ciphertexts only."""
        if not contributions:
            raise ValueError("nothing to add: no contribution")
        terms = sum(c.terms for c in contributions)
        if terms > self.layout.max_terms:
            raise ValueError(f"{terms} terms exceed the round's layout of at most {self.layout.max_terms}: the sum could overflow")
        for c in contributions:
            self.check(c, deep=False)  # the server checked each ciphertext when it arrived
        load = ts.bfv_vector_from if self.layout.scheme == "bfv" else ts.ckks_vector_from
        total = []
        for i in range(len(contributions[0].chunks)):
            acc = load(self.key.context, contributions[0].chunks[i])
            for c in contributions[1:]:
                acc += load(self.key.context, c.chunks[i])
            total.append(acc.serialize())
        return Encrypted(tuple(total), float(sum(c.weight for c in contributions)), terms, sum(c.clipped for c in contributions))

    def check(self, encrypted: Encrypted, deep: bool = True) -> None:
        """Raise ValueError unless ``encrypted`` has this layout's chunk count and, with ``deep``,
        each chunk is a ciphertext of this context (deserialising validates parameters and sizes)."""
        expected = self.layout.chunks(self.key)
        if len(encrypted.chunks) != expected:
            raise ValueError(f"{len(encrypted.chunks)} ciphertexts instead of the {expected} this model needs")
        if not (math.isfinite(encrypted.weight) and encrypted.weight > 0):
            raise ValueError(f"weight {encrypted.weight} is not a positive number")
        if not 1 <= encrypted.terms <= self.layout.max_terms:
            raise ValueError(f"{encrypted.terms} terms is outside 1..{self.layout.max_terms}")
        if not deep:
            return
        limit = 2 * POLY_DEGREE * 8 * len(COEFF_BITS) + 4096  # two polynomials over every prime, plus headers
        load = ts.bfv_vector_from if self.layout.scheme == "bfv" else ts.ckks_vector_from
        for i, chunk in enumerate(encrypted.chunks):
            if len(chunk) > limit:  # refused before TenSEAL parses it
                raise ValueError(f"ciphertext {i} has {len(chunk)} bytes, more than a ciphertext of this context can")
            try:
                vector = load(self.key.context, chunk)
            except Exception as exc:  # TenSEAL raises ValueError or RuntimeError on bad bytes
                raise ValueError(f"ciphertext {i} is not a valid {self.layout.scheme} ciphertext of this context ({exc})") from None
            if vector.size() > slots_per_chunk(self.layout.scheme):
                raise ValueError(f"ciphertext {i} holds {vector.size()} slots, more than one ciphertext can")

    def _need_secret(self, what: str) -> None:
        if not self.key.secret:
            raise HEKeyError(f"cannot {what} with a public HE context: it holds no secret key")
