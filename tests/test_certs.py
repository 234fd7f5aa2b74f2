"""crypto.certs and `fedlearn certs generate`: a CA and server certificate made with
cryptography's x509 API, and a real Flower SuperLink serving TLS with them."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from crypto import certs
from simulations.cli import main as cli
from simulations.cluster import free_port, wait_for_text
from simulations.processes import stop_process_groups

BIN = Path(sys.executable).parent


def test_the_server_certificate_names_every_host_and_is_signed_by_the_ca(tmp_path):
    made = certs.generate(tmp_path, ["fl.example.org", "10.0.0.7", "localhost"], days=30)
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert 29 <= (server.not_valid_after_utc - server.not_valid_before_utc).days <= 31
    for key in (made.ca_key, made.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_nothing_is_overwritten_and_bad_input_gets_a_clear_error(tmp_path, capsys):
    assert cli(["certs", "generate", "--out", str(tmp_path)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert cli(["certs", "generate", "--out", str(tmp_path)]) == 2
    assert "already holds ca.crt" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert cli(["certs", "generate", "--out", str(tmp_path / "b"), "--host", "bad host"]) == 2
    assert "neither an IP address nor a DNS name" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert cli(["certs", "generate", "--out", str(tmp_path / "c"), "--days", "0"]) == 2


def start(command, log: Path) -> subprocess.Popen:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            cwd=log.parent, start_new_session=True)


def test_a_flower_superlink_serves_tls_with_them_and_a_supernode_trusting_the_ca_connects(tmp_path):
    good, other = certs.generate(tmp_path / "good"), certs.generate(tmp_path / "other")
    link_port = free_port()
    processes = []
    try:
        link_log = tmp_path / "superlink.log"
        processes.append(start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(good.ca_cert),
                                "--ssl-certfile", str(good.server_cert), "--ssl-keyfile", str(good.server_key),
                                "--port", str(link_port), "--database", ":flwr-in-memory:"], link_log))
        wait_for_text(link_log, f"running on https://127.0.0.1:{link_port}", 60)

        def supernode(ca: Path, name: str) -> Path:
            log = tmp_path / f"{name}.log"
            processes.append(start([str(BIN / "flower-supernode"), "--root-certificates", str(ca),
                                    "--superlink", f"127.0.0.1:{link_port}", "--port", str(free_port()),
                                    "--node-config", "partition-id=0 num-partitions=1"], log))
            return log

        supernode(good.ca_cert, "trusting")
        wait_for_text(link_log, "Activated node_id", 60)
        stranger = supernode(other.ca_cert, "stranger")  # trusts another CA: the TLS handshake fails
        wait_for_text(stranger, "Connection attempt failed", 60)
        assert link_log.read_text().count("Activated node_id") == 1
    finally:
        for process in reversed(processes):
            stop_process_groups([process])
    assert all(p.poll() is not None for p in processes)
