"""Writing key material: a new file only (never over an existing one), private files created
with mode 0600 from the start, so they are never readable by others, not even briefly."""

from __future__ import annotations

import os
from pathlib import Path


def write_new(path: Path, data: bytes, *, private: bool) -> Path:
    """Create ``path`` with ``data``; FileExistsError if it exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path
