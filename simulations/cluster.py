"""`fedlearn local-cluster`: a real deployment on loopback, in one command.

A Flower SuperLink (TLS, SuperNode authentication) and N SuperNodes run as separate processes on
free 127.0.0.1 ports, each node enrolled twice: its EC key registered with the SuperLink
(`flwr supernode register`, Flower's transport identity) and its Ed25519 key in fedlearn's
access policy (update signatures). The job is submitted with `flwr run`, signed by a generated
operator key, and writes the same run directory as `fedlearn simulate`. Only Flower's own
executables move bytes: this module starts them, waits for them and stops them.

Everything the cluster needs lives in its directory (certificates, keys, policy, Flower's
config, one log per process), so a failure can be read afterwards.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from crypto import certs, signing
from fedlearn.access import provision_simulation
from fedlearn.config import RunConfig
from fedlearn.errors import FedlearnError
from simulations.processes import stop_process_groups

BIN = Path(sys.executable).parent
CONNECTION = "local-cluster"  # the SuperLink connection name in the cluster's Flower config
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
REFUSED_NODE = "Failed to activate SuperNode"  # what flower-supernode logs when the SuperLink refuses its key


class ClusterError(FedlearnError):
    """A cluster process did not start, or the run did not finish; the message names the log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_directory() -> Path:
    """The Flower App `flwr run` builds: this source tree (its pyproject declares the apps)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "server" / "app.py").is_file():
        raise ClusterError(
            f"local-cluster needs fedlearn's source tree (pyproject.toml next to {root / 'simulations'}): "
            "`flwr run` builds the app from it. Install with `pip install -e .` from a checkout."
        )
    return root


def wait_for_text(log: Path, text: str, seconds: float, process: subprocess.Popen | None = None, count: int = 1) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if log.exists() and log.read_text(errors="replace").count(text) >= count:
            return
        if process is not None and process.poll() is not None:
            raise ClusterError(f"{log.stem} exited with code {process.returncode} before '{text}'; see {log}")
        time.sleep(0.2)
    raise ClusterError(f"{log.stem}: no '{text}' (x{count}) within {seconds:g}s; see {log}")


class LocalCluster:
    """Start with ``with LocalCluster(directory, nodes) as cluster:``; everything stops on exit."""

    def __init__(self, directory: Path, nodes: int, *, echo: Callable[[str], None] = print):
        if nodes < 1:
            raise ClusterError(f"--nodes {nodes}: a cluster needs at least one SuperNode")
        self.directory = Path(directory).resolve()
        self.nodes = nodes
        self.echo = echo
        self.processes: list[subprocess.Popen] = []
        self.supernodes: dict[int, subprocess.Popen] = {}
        self.keys = self.directory / "keys"
        self.port = 0
        self.env = {**os.environ, **QUIET, "FLWR_HOME": str(self.directory / "flwr")}

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- enrolment -------------------------------------------------------------------------

    def enrol(self, config: RunConfig) -> RunConfig:
        """Certificates, keys, policy and Flower's config in the cluster directory; returns
        ``config`` pointing at them and signed by the cluster's operator."""
        self.directory.mkdir(parents=True, exist_ok=False)
        self.tls = certs.generate(self.directory / "certs")
        signing.write_keypair(self.keys, "audit")
        self.port = free_port()
        flwr_home = self.directory / "flwr"
        flwr_home.mkdir()
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.tls.ca_cert}"\n'
        )
        # The ServerApp runs in the SuperLink's working directory: a relative out-dir would land there.
        out_dir = str(Path(config.out_dir).expanduser().resolve())
        config = config.replace(num_clients=self.nodes, audit_key=str(self.keys / "audit.key"), out_dir=out_dir)
        _, config = provision_simulation(self.directory, config, key_files=True)  # node-<i>.key, operator, policy.toml
        for index in range(self.nodes):
            certs.generate_supernode_auth(self.keys, f"node-{index}")
        return config

    # --- processes -------------------------------------------------------------------------

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = self.directory / f"{name}.log"
        process = subprocess.Popen(
            command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=self.env, cwd=self.directory,
            start_new_session=True,  # its own process group: stop() reaches the children it spawns
        )
        self.processes.append(process)
        return process

    def start_superlink(self) -> None:
        tls = self.tls
        process = self._start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth", "--port", str(self.port),
            "--database", ":flwr-in-memory:",
        ])
        wait_for_text(self.directory / "superlink.log", f"running on https://127.0.0.1:{self.port}", 90, process)
        self.echo(f"SuperLink   https://127.0.0.1:{self.port} (TLS, SuperNode authentication)")

    def register(self, indices: list[int]) -> None:
        """`flwr supernode register` for each node's public auth key (in parallel: each call
        starts the flwr CLI, which takes seconds)."""
        calls = {
            i: subprocess.Popen(
                [str(BIN / "flwr"), "supernode", "register", str(self.keys / f"node-{i}.auth.pub"), CONNECTION],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, cwd=self.directory,
            )
            for i in indices
        }
        for i, call in calls.items():
            output, _ = call.communicate(timeout=120)
            if call.returncode != 0 or "registered successfully" not in output:
                raise ClusterError(f"flwr supernode register node-{i} failed (exit {call.returncode}): {output[-800:]}")

    def start_supernode(self, index: int, auth_key: Path | None = None, name: str = "") -> subprocess.Popen:
        """SuperNode ``index`` serving partition ``index``; ``auth_key`` overrides its registered key."""
        node_config = (f"partition-id={index} num-partitions={self.nodes} node-key='{self.keys / f'node-{index}.key'}' "
                       f"access-policy='{self.directory / 'policy.toml'}'")  # the node's own copy of who its peers may be
        process = self._start(name or f"supernode-{index}", [
            str(BIN / "flower-supernode"), "--root-certificates", str(self.tls.ca_cert),
            "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
            "--auth-supernode-private-key", str(auth_key or self.keys / f"node-{index}.auth.key"),
            "--node-config", node_config,
        ])
        if not name:
            self.supernodes[index] = process
        return process

    def start(self, config: RunConfig) -> RunConfig:
        """Enrol, start the SuperLink and every SuperNode; return the signed run config."""
        config = self.enrol(config)
        self.start_superlink()
        self.register(list(range(self.nodes)))
        for index in range(self.nodes):
            self.start_supernode(index)
        wait_for_text(self.directory / "superlink.log", "Activated node_id", 120, count=self.nodes)
        self.echo(f"SuperNodes  {self.nodes} registered and connected")
        return config

    def submit(self, config: RunConfig, on_line: Callable[[str], None] | None = None) -> Path:
        """`flwr run` the job and wait for it; return the run directory it wrote."""
        out = Path(config.out_dir).expanduser().resolve()
        before = set(out.iterdir()) if out.exists() else set()
        if config.resume_from:  # the run continues in its own directory
            before.discard(Path(config.resume_from).expanduser().resolve())
        overrides = self.directory / "run-config.toml"
        overrides.write_text(config.to_toml())
        log = self.directory / "flwr-run.log"
        with log.open("w") as sink:
            process = subprocess.Popen(
                [str(BIN / "flwr"), "run", str(app_directory()), CONNECTION, "--stream", "--run-config", str(overrides)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, cwd=self.directory,
                start_new_session=True,
            )
            self.processes.append(process)
            for line in process.stdout:
                sink.write(line)
                sink.flush()
                if on_line:
                    on_line(line.rstrip("\n"))
            process.wait()
        made = [p for p in (set(out.iterdir()) if out.exists() else set()) - before if (p / "config.toml").exists()]
        if len(made) != 1:
            raise ClusterError(f"the run wrote no run directory under {out} (flwr run exit {process.returncode}); see {log}")
        run_dir = made[0]
        if not (run_dir / "summary.json").exists():
            raise ClusterError(f"the run stopped before it finished (flwr run exit {process.returncode}); "
                               f"what it wrote is in {run_dir}, Flower's log in {log}")
        return run_dir

    def stop(self) -> None:
        """Stop every process this cluster started, and whatever they spawned."""
        stop_process_groups(reversed(self.processes))
        self.processes.clear()
