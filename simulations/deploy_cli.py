"""`fedlearn certs generate` (the TLS material of a real deployment) and `fedlearn local-cluster`
(the whole deployment path, SuperLink and SuperNodes as processes on loopback)."""

from __future__ import annotations

import argparse
import datetime as dt
import signal
from pathlib import Path

from crypto import certs
from simulations.argtypes import int_between, out_directory


def add_commands(sub, config_from_args) -> None:
    group = sub.add_parser("certs", help="TLS certificates for a deployment")
    group_sub = group.add_subparsers(dest="certs_command", required=True)
    generate = group_sub.add_parser("generate", help="create a CA and a server certificate (ca.crt, server.pem, their keys)")
    generate.add_argument("--out", required=True, type=out_directory, help="directory for ca.crt, ca.key, server.pem, server.key")
    generate.add_argument("--host", action="append", dest="hosts", metavar="NAME",
                          help=f"a DNS name or IP address clients dial (repeat; default: {', '.join(certs.DEFAULT_HOSTS)})")
    generate.add_argument("--days", type=int_between(1, 36500, " days (100 years)"), default=365,
                          help="validity in days (default 365)")
    generate.set_defaults(func=_generate)

    cluster = sub.add_parser(
        "local-cluster",
        help="run a job as a real deployment on this machine: a TLS SuperLink with node auth and N SuperNodes",
    )
    cluster.add_argument("--nodes", type=int_between(1, 256, " processes on this machine"), default=3,
                         help="SuperNodes to start, one partition each (default 3)")
    cluster.add_argument("--preset", help="as for `fedlearn simulate`")
    cluster.add_argument("--run-config", help="as for `fedlearn simulate` (num-clients is --nodes)")
    cluster.add_argument("--out", help="directory for the run directory and the cluster's files (default: runs)")
    cluster.set_defaults(func=lambda args: _local_cluster(args, config_from_args))


def _generate(args: argparse.Namespace) -> int:
    made = certs.generate(args.out, args.hosts, args.days)
    print(f"CA certificate   {made.ca_cert} (give it to every SuperNode and to flwr: it is what they trust)")
    print(f"CA key           {made.ca_key} (mode 0600: keep it offline; it can sign servers)")
    print(f"server cert/key  {made.server_cert} {made.server_key} (for flower-superlink --ssl-certfile/--ssl-keyfile)")
    print(f"hosts            {', '.join(args.hosts or certs.DEFAULT_HOSTS)}")
    return 0


def _local_cluster(args: argparse.Namespace, config_from_args) -> int:
    from fedlearn.config import parse_overrides
    from fedlearn.errors import ConfigError
    from fedlearn.paths import writable_directory
    from simulations.cluster import LocalCluster

    config = config_from_args(args.preset, args.run_config, args.out)
    if "num-clients" in parse_overrides(args.run_config or "") and config.num_clients != args.nodes:
        raise ConfigError([f"num-clients={config.num_clients} but --nodes {args.nodes}: each SuperNode is one client, drop num-clients"])
    writable_directory(config.out_dir, "out-dir (--out)")  # before any process starts
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    directory = Path(config.out_dir).expanduser() / f"cluster-{stamp}"
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop the cluster on kill as on Ctrl-C
    with LocalCluster(directory, args.nodes) as cluster:
        print(f"cluster     {cluster.directory} (certificates, keys, policy, one log per process)")
        config = cluster.start(config)

        def show(line: str) -> None:
            if "fedlearn round" in line or "ERROR" in line:
                print("  " + line.split(":", 1)[-1].strip(), flush=True)

        print(f"run         flwr run . {config.num_rounds} rounds (Flower's log: {cluster.directory / 'flwr-run.log'})")
        run_dir = cluster.submit(config, on_line=show)
    from simulations.cli import print_next_steps

    print_next_steps(run_dir)
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
