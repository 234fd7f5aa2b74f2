"""The on-disk array cache: computed once across processes, rebuilt when damaged, never stale."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from fedlearn import arraycache, data
from fedlearn.config import RunConfig

ARRAYS = {"a": np.arange(5, dtype=np.int64), "b": np.ones((2, 3), dtype=np.float32)}


def _never() -> dict:
    raise AssertionError("computed again although the entry was on disk")


def _equal(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(
        left[k].dtype == right[k].dtype and left[k].tobytes() == right[k].tobytes() for k in left)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLEARN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_second_call_reads_what_the_first_computed(cache):
    first = arraycache.cached_arrays("kind", {"n": 1}, lambda: ARRAYS, names=("a", "b"), data=b"input")
    second = arraycache.cached_arrays("kind", {"n": 1}, _never, names=("a", "b"), data=b"input")
    assert _equal(first, ARRAYS) and _equal(second, ARRAYS)
    assert len(list((cache / "kind").glob("*.npz"))) == 1


def test_other_parameters_input_or_library_versions_are_other_entries(cache, monkeypatch):
    path = arraycache.entry_path("kind", {"n": 1}, data=b"input", libraries=("numpy",))
    assert path != arraycache.entry_path("kind", {"n": 2}, data=b"input", libraries=("numpy",))
    assert path != arraycache.entry_path("kind", {"n": 1}, data=b"other", libraries=("numpy",))
    assert path != arraycache.entry_path("other", {"n": 1}, data=b"input", libraries=("numpy",))
    monkeypatch.setattr(arraycache, "version", lambda package: "0.0-another")
    assert path != arraycache.entry_path("kind", {"n": 1}, data=b"input", libraries=("numpy",))


@pytest.mark.parametrize("damage", [b"", b"not a zip file", b"PK\x03\x04truncated"])
def test_a_damaged_entry_is_rebuilt_and_replaced(cache, damage):
    path = arraycache.entry_path("kind", {"n": 1})
    path.parent.mkdir(parents=True)
    path.write_bytes(damage)
    assert _equal(arraycache.cached_arrays("kind", {"n": 1}, lambda: ARRAYS, names=("a", "b")), ARRAYS)
    assert _equal(arraycache.cached_arrays("kind", {"n": 1}, _never, names=("a", "b")), ARRAYS)


def test_an_entry_without_the_expected_arrays_is_rebuilt(cache):
    arraycache.cached_arrays("kind", {"n": 1}, lambda: {"a": ARRAYS["a"]}, names=("a",))
    assert _equal(arraycache.cached_arrays("kind", {"n": 1}, lambda: ARRAYS, names=("a", "b")), ARRAYS)


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FEDLEARN_CACHE_DIR", str(blocker))
    assert _equal(arraycache.cached_arrays("kind", {"n": 1}, lambda: ARRAYS, names=("a", "b")), ARRAYS)
    assert blocker.read_text() == "not a folder"


def test_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLEARN_CACHE_DIR", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert arraycache.cache_dir() is None
    assert _equal(arraycache.cached_arrays("kind", {"n": 1}, lambda: ARRAYS, names=("a", "b")), ARRAYS)
    assert list(tmp_path.iterdir()) == []


DIGEST_SCRIPT = """
import hashlib, sys
from fedlearn import data
from fedlearn.config import RunConfig
config = RunConfig.from_flat({"num-clients": 5, "partitioner": "dirichlet", "out-dir": "unused"})
digest = hashlib.sha256()
for i in range(5):
    split = data.client_split(config, i, 5)
    digest.update(split.x.tobytes() + split.y.tobytes())
print(digest.hexdigest(), *sorted(m for m in ("sklearn", "flwr_datasets", "datasets") if m in sys.modules))
"""


def test_a_fresh_client_process_gets_the_same_split_without_importing_sklearn_or_flwr_datasets(cache, monkeypatch):
    config = RunConfig.from_flat({"num-clients": 5, "partitioner": "dirichlet", "out-dir": "unused"})
    monkeypatch.setattr(data, "load", data.load.__wrapped__)  # this process's memory holds nothing
    monkeypatch.setattr(data, "_partitions_cached", data._partitions_cached.__wrapped__)
    digest = hashlib.sha256()
    for i in range(5):
        split = data.client_split(config, i, 5)  # computes and fills the cache
        digest.update(split.x.tobytes() + split.y.tobytes())
    fresh = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT], capture_output=True, text=True, check=True)
    assert fresh.stdout.split() == [digest.hexdigest()]
