"""`fedlearn certs generate`: the TLS material of a real deployment (Flower SuperLink and SuperNodes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from crypto import certs


def add_commands(sub) -> None:
    group = sub.add_parser("certs", help="TLS certificates for a deployment")
    group_sub = group.add_subparsers(dest="certs_command", required=True)
    generate = group_sub.add_parser("generate", help="create a CA and a server certificate (ca.crt, server.pem, their keys)")
    generate.add_argument("--out", required=True, type=Path, help="directory for ca.crt, ca.key, server.pem, server.key")
    generate.add_argument("--host", action="append", dest="hosts", metavar="NAME",
                          help=f"a DNS name or IP address clients dial (repeat; default: {', '.join(certs.DEFAULT_HOSTS)})")
    generate.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    generate.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    made = certs.generate(args.out, args.hosts, args.days)
    print(f"CA certificate   {made.ca_cert} (give it to every SuperNode and to flwr: it is what they trust)")
    print(f"CA key           {made.ca_key} (mode 0600: keep it offline; it can sign servers)")
    print(f"server cert/key  {made.server_cert} {made.server_key} (for flower-superlink --ssl-certfile/--ssl-keyfile)")
    print(f"hosts            {', '.join(args.hosts or certs.DEFAULT_HOSTS)}")
    return 0
