"""The one place for helpers shared by test modules: test modules import from here, never from
one another or from conftest.py (which imports its paths from here and keeps the fixtures that
every test gets).

- paths and data: REPO, SHARED_DATA, mnist_dir
- optional dependencies: needs_openfhe
- Flower Messages outside a running ServerApp: message
- a real Flower simulation from a test: run_simulation (RecordingGrid)
- the `fedlearn` command in a subprocess: ENV, FEDLEARN, run_command, audit_verdict
- access control: the access_setup fixture, assert_log_verifies
- deployments: cluster_processes, audit_records
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from flwr.app import Message, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import ServerApp

from crypto import signing
from fedlearn import audit
from fedlearn.access import AccessPolicy
from fedlearn.config import RunConfig
from server.grid import GridWrapper
from simulations import engine

# ---- Paths and data ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def mnist_dir() -> Path | None:
    """Where MNIST lives: $FEDLEARN_DATA_DIR or the workspace's ../shared/data."""
    for candidate in (os.environ.get("FEDLEARN_DATA_DIR"), SHARED_DATA):
        if candidate and (Path(candidate) / "mnist" / "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate).resolve()
    return None


# ---- Optional dependencies: skipped where absent, required where CI installs them ----------


def needs_openfhe():
    """OpenFHE's bindings, or a skip; with FEDLEARN_REQUIRE_OPENFHE set (CI installs them) their
    absence is an error, so the threshold tests cannot silently stop running."""
    if os.environ.get("FEDLEARN_REQUIRE_OPENFHE"):
        return importlib.import_module("openfhe")
    return pytest.importorskip("openfhe", reason="OpenFHE's Python bindings are not installed (docs/privacy.md: Threshold HE)")


# ---- Flower Messages outside a running ServerApp (which normally supplies the run id) -------


def message(content: RecordDict, *, src: int = 2, dst: int = 1, message_type: str = MessageType.TRAIN,
            reply_to: str = "") -> Message:
    metadata = Metadata(
        run_id=1, message_id="", src_node_id=src, dst_node_id=dst, reply_to_message_id=reply_to,
        group_id="1", created_at=0.0, ttl=60.0, message_type=message_type,
    )
    return make_message(metadata=metadata, content=content)


# ---- A real Flower simulation: the server's summary, and optionally every reply it received,
# serialized as it travelled ----------------------------------------------------------------


class RecordingGrid(GridWrapper):
    """Keeps the serialized payload of every reply the server receives."""

    def __init__(self, grid):
        super().__init__(grid)
        self.replies: list[tuple[str, bytes]] = []
        self.received = []  # the reply Messages themselves

    def send_and_receive(self, messages, *, timeout=None):
        return self._record(self._grid.send_and_receive(messages, timeout=timeout))

    def pull_messages(self, message_ids):  # how the server's PromptGrid collects replies
        return self._record(self._grid.pull_messages(message_ids))

    def _record(self, replies):
        replies = list(replies)
        for r in replies:
            if not r.has_error():
                self.received.append(r)
                self.replies.append((r.metadata.message_type, recorddict_to_proto(r.content).SerializeToString()))
        return replies


def run_simulation(config: RunConfig, record: bool = False, client_app=None):
    """Run ``config`` as a Flower simulation; (the server's summary, the RecordingGrid or None).
    ``client_app``: fedlearn's by default."""
    # Imported here, not above: they load torch, and conftest.py imports this module for every test.
    from clients.app import app as fedlearn_client_app
    from server.app import run_federation

    client_app = client_app or fedlearn_client_app

    summary, recorders = {}, []

    app = ServerApp()

    @app.main()
    def main(grid, context):
        recorder = RecordingGrid(grid) if record else grid
        recorders.append(recorder)
        summary.update(run_federation(recorder, config, on_round=lambda r: None))

    engine.simulate(app, client_app, config.num_clients, num_cpus_per_client=config.client_resources_num_cpus,
                    num_gpus_per_client=config.client_resources_num_gpus, ray_address=config.ray_address)
    assert summary, "the simulation ended without a result"
    return summary, (recorders[0] if record else None)


# ---- The `fedlearn` command as a user runs it, in a subprocess -----------------------------

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
FEDLEARN = [sys.executable, "-m", "simulations.cli"]


def run_command(args, timeout=300, **kwargs):
    """``args`` in a subprocess in the repository, with ENV unless ``env`` is given; output captured."""
    return subprocess.run(args, cwd=REPO, env=kwargs.pop("env", ENV), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def audit_verdict(run_dir, *extra):
    """`fedlearn audit verify` on a run directory's audit log and key."""
    return run_command([*FEDLEARN, "audit", "verify", run_dir / "audit.jsonl", "--key", run_dir / "audit.pub", *extra],
                       timeout=60)


# ---- Access control ------------------------------------------------------------------------


@pytest.fixture
def access_setup(tmp_path):
    """(keys, policy, audit log) for access-control tests: nodes "good", "nan", "shape" (trainer and
    evaluator), "revoked" (trainer, revoked), "evaluator" and "unknown" (not enrolled), and the
    audit key; the log holds its run_start record."""
    names = ["good", "nan", "shape", "revoked", "evaluator", "unknown"]
    keys = {n: signing.generate() for n in names}
    policy = AccessPolicy()
    for name in ("good", "nan", "shape"):
        policy.enroll(name, keys[name].public_key(), ("trainer", "evaluator"))
    policy.enroll("revoked", keys["revoked"].public_key(), ("trainer",))
    policy.enroll("evaluator", keys["evaluator"].public_key(), ("evaluator",))
    policy.revoke("revoked", "compromised")
    keys["audit"] = signing.generate()
    log = audit.AuditLog(tmp_path / "audit.jsonl", keys["audit"], "run-A")
    log.append("run_start", 0, {})  # a log must start with it to verify
    return keys, policy, log


def assert_log_verifies(setup):
    """The audit log of an ``access_setup`` verifies (a run still going is allowed)."""
    keys, _, log = setup
    verdict = audit.verify(log.path, keys["audit"].public_key(), allow_incomplete=True)
    assert verdict.ok, verdict.reason


# ---- Deployments ---------------------------------------------------------------------------


def cluster_processes(directory: Path) -> list[psutil.Process]:
    """Every live process whose command line or working directory is inside ``directory``."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        try:
            text = " ".join(process.info["cmdline"] or []) + " " + (process.info["cwd"] or "")
        except psutil.Error:
            continue
        if str(directory) in text and process.pid != psutil.Process().pid:
            found.append(process)
    return found


def audit_records(run_dir: Path) -> list[dict]:
    """A run directory's audit records, once its log verifies against the run's audit key."""
    verdict = audit.verify(run_dir / "audit.jsonl", signing.load_public(run_dir / "audit.pub"))
    assert verdict.ok, verdict.summary()
    return audit.read(run_dir / "audit.jsonl")
