"""Optional dependencies of some tests: skipped where absent, required where CI installs them."""

from __future__ import annotations

import importlib
import os

import pytest


def openfhe():
    """OpenFHE's bindings, or a skip; with FEDLEARN_REQUIRE_OPENFHE set (CI installs them) their
    absence is an error, so the threshold tests cannot silently stop running."""
    if os.environ.get("FEDLEARN_REQUIRE_OPENFHE"):
        return importlib.import_module("openfhe")
    return pytest.importorskip("openfhe", reason="OpenFHE's Python bindings are not installed (README: Threshold HE)")
