"""Shared fixtures. Flower must never phone home from tests. Test modules import helpers from
tests/helpers.py, never from here."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
# The array cache (fedlearn/arraycache.py) of this test session, shared with the processes tests
# start, never the user's own; removed at the end unless FEDLEARN_CACHE_DIR was set.
_SESSION_CACHE = None if "FEDLEARN_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="fedlearn-test-cache-")
if _SESSION_CACHE:
    os.environ["FEDLEARN_CACHE_DIR"] = _SESSION_CACHE

# After the settings above: tests.helpers imports Flower.
from simulations import engine  # noqa: E402
from tests.helpers import mnist_dir  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_ray_runtime():
    """The session's in-process simulations share one Ray runtime (engine.shared_runtime): about
    7 s less per simulation. Commands tests start as processes start their own, as users' do."""
    with engine.shared_runtime():
        yield


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


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
