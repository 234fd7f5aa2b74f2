"""The wheel: our `crypto` package ships, no `Crypto` does, and our own Shamir sharing comes from
pycryptodomex (`Cryptodome`), not pycryptodome (`Crypto`, which collides with `crypto/` on a
case-insensitive filesystem: macOS, Windows). Note that flwr 1.41 itself still requires
pycryptodome, so this checks our dependencies only, not the whole installed environment."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from tests.helpers import REPO

# Not copied into the build tree: virtualenvs, build outputs, run directories (all git-ignored).
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", ".ci-venv", "build", "dist", "*.egg-info", "runs", "deploy", "__pycache__",
    ".pytest_cache", ".hypothesis",
)


def _distribution_names(requirements: list[str]) -> set[str]:
    """PEP 503-normalised distribution names of requirement strings (`flwr[simulation]>=1` -> flwr)."""
    names = set()
    for requirement in requirements:
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
        names.add(re.sub(r"[-_.]+", "-", name).lower())
    return names


@pytest.mark.slow
def test_the_wheel_holds_crypto_and_not_Crypto_and_depends_on_pycryptodomex(tmp_path):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = _distribution_names(project["dependencies"])
    assert "pycryptodomex" in names
    assert "pycryptodome" not in names

    # Build from a copy, so that setuptools' build/ and *.egg-info land in tmp_path and not in the
    # working tree, and no stale build/lib from an earlier build can slip files into the wheel.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCES)
    out = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert built.returncode == 0, f"python -m build failed:\n{built.stdout[-4000:]}\n{built.stderr[-4000:]}"
    wheels = list(out.glob("fedlearn-*.whl"))
    assert len(wheels) == 1, wheels

    with zipfile.ZipFile(wheels[0]) as wheel:
        files = wheel.namelist()
        metadata = next(f for f in files if f.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1] for line in wheel.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:") and "extra ==" not in line]

    assert "crypto/secagg.py" in files
    assert not [f for f in files if f.startswith("Crypto/")]
    # The built metadata agrees with pyproject.toml.
    built_names = _distribution_names(requires)
    assert "pycryptodomex" in built_names
    assert "pycryptodome" not in built_names
