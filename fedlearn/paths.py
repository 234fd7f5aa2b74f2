"""Checking where a command will write before it does any work: a wrong ``--out`` fails in a
second with the path and the fix, not minutes later as a traceback. The checks leave no trace
(no directory created, no file left behind)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fedlearn.errors import PathError


def expand(path: str | Path, option: str = "path") -> Path:
    """``path`` with ``~`` expanded; a PathError for ``~user`` of no known user."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory."
        raise PathError(f"{option} {path}: no home directory for {str(path).split('/')[0]!r}") from None


def writable_directory(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a directory this process can create files in (it may not exist yet: then
    the nearest existing parent must be a directory it can write to)."""
    if not str(path).strip():
        raise PathError(f"{option} is empty: give a directory")
    path = expand(path, option)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise PathError(f"{option} {path} {where}, not a directory: give a directory")
    _probe(existing, f"{option} {path}")
    return path


def new_file(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a file that does not exist yet, in a directory this process can write to."""
    if not str(path).strip():
        raise PathError(f"{option} is empty: give a file name")
    path = expand(path, option)
    if path.exists():
        raise PathError(f"{option} {path} already exists: it is never overwritten; give a new file name")
    writable_directory(path.parent, f"{option} {path}: its directory")
    return path


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def _probe(directory: Path, what: str) -> None:
    """Create and drop an unnamed file in ``directory`` (permissions, read-only mounts and
    full disks all show here; os.access does not see the last two, nor anything as root)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise PathError(f"{what}: cannot write in {directory} ({exc.strerror or exc}): give a directory you can write to") from None
