"""Shared fixtures. Flower must never phone home from tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def mnist_dir() -> Path | None:
    """Where MNIST lives: $FEDLEARN_DATA_DIR or the workspace's ../shared/data."""
    for candidate in (os.environ.get("FEDLEARN_DATA_DIR"), SHARED_DATA):
        if candidate and (Path(candidate) / "mnist" / "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    return None


@pytest.fixture
def mnist_data_dir() -> Path:
    found = mnist_dir()
    if found is None:
        pytest.skip("MNIST not found: set FEDLEARN_DATA_DIR to a directory holding mnist/*.gz")
    return found


@pytest.fixture
def run_identity():
    """Message() outside a Flower runtime needs a task's ids (strategy tests without a simulation)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
