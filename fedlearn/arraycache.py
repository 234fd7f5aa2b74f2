"""Arrays derived from a dataset, kept on disk so that a new process does not rebuild them.

Every deployed ClientApp message and every simulated client starts a fresh Python process.
Without this cache each one imports scikit-learn (to read the digits) and flwr-datasets with
Hugging Face datasets (to partition), about 4 s of CPU, only to rebuild the arrays the process
before it built. An entry's name is a hash of everything that determines it (the inputs, the
parameters and the versions of the libraries that computed it), so a changed input or library
is a new entry, never a stale one. An unreadable entry is recomputed and replaced; a cache that
cannot be written is skipped. ``FEDLEARN_CACHE_DIR`` moves it (default
``$XDG_CACHE_HOME/fedlearn``, else ``~/.cache/fedlearn``); ``FEDLEARN_CACHE_DIR=off`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

CACHE_ENV = "FEDLEARN_CACHE_DIR"
FORMAT = 1  # bump when what an entry holds changes meaning


def cache_dir() -> Path | None:
    """Where entries live, or None when the cache is off."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None and chosen.strip().lower() == "off":
        return None
    if chosen:
        try:
            return Path(chosen).expanduser()
        except RuntimeError:  # ~user of no known user: no cache rather than a failed run
            return None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedlearn"


def _library_versions(packages: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def entry_path(kind: str, key: dict, *, data: bytes = b"", libraries: tuple[str, ...] = ()) -> Path | None:
    """The file of one entry: ``kind``/sha256(format, key, library versions, data).npz."""
    root = cache_dir()
    if root is None:
        return None
    described = json.dumps([FORMAT, kind, key, _library_versions(libraries)], sort_keys=True)
    digest = hashlib.sha256(described.encode() + b"\0" + data).hexdigest()
    return root / kind / f"{digest}.npz"


def _read(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # absent, truncated or foreign: (re)build it
        return None


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write whole or not at all (a temporary file renamed into place), so a process that reads
    while another writes sees the old entry or the new one; a read-only cache is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, **arrays)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def cached_arrays(
    kind: str, key: dict, compute: Callable[[], dict[str, np.ndarray]], *,
    names: tuple[str, ...], data: bytes = b"", libraries: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """``compute()``'s arrays (named ``names``), from disk when an earlier process already
    computed them.

    ``key`` (JSON-serialisable parameters) and ``data`` (input bytes) must determine the result
    together with the versions of ``libraries``."""
    path = entry_path(kind, key, data=data, libraries=libraries)
    stored = _read(path) if path is not None else None
    if stored is not None and sorted(stored) == sorted(names):
        return stored
    arrays = compute()
    if path is not None:
        _write(path, arrays)
    return arrays
