"""`fedlearn keys he-generate` and `fedlearn decrypt-model`: key material and results of privacy=he."""

from __future__ import annotations

import argparse
from pathlib import Path

from crypto.he import SCHEMES, HEKey, HEKeyError, generate_pair
from fedlearn.errors import ConfigError
from simulations.argtypes import int_between, new_file, out_directory


def add_commands(sub, keys_sub) -> None:
    generate = keys_sub.add_parser(
        "he-generate", help="create an HE key pair: he.secret for the clients (0600) and he.public for the server"
    )
    generate.add_argument("--out", required=True, type=out_directory, help="directory for he.secret and he.public")
    generate.add_argument("--scheme", choices=SCHEMES, default="bfv", help="bfv (default, packed fixed point) or ckks")
    generate.add_argument("--max-clients", type=int_between(1, 1 << 18), default=100,
                          help="most clients one round may add (sets the bfv noise budget; default 100)")
    generate.set_defaults(func=_he_generate)

    decrypt = sub.add_parser("decrypt-model", help="decrypt a privacy=he run's final model into model.safetensors")
    decrypt.add_argument("run_dir", type=Path, help="the run directory (has model.he.safetensors and config.toml)")
    decrypt.add_argument("--key", required=True, type=Path, help="the clients' secret context (he.secret)")
    decrypt.add_argument("--out", type=new_file, help="output file (default: RUN_DIR/model.safetensors; never overwritten)")
    decrypt.set_defaults(func=_decrypt_model)


def _he_generate(args: argparse.Namespace) -> int:
    secret, public = generate_pair(args.out, args.scheme, args.max_clients)
    key = HEKey.load(public, secret=False)
    print(f"secret context {secret} (mode 0600: give it to every client, never to the server)")
    print(f"public context {public} (for the server: he-public={public})")
    print(f"scheme {key.info.scheme}, sums of up to {key.info.max_terms} clients, context id {key.info.context_id[:16]}")
    return 0


def _decrypt_model(args: argparse.Namespace) -> int:
    from safetensors.numpy import save

    from fedlearn import he, strategies
    from fedlearn.config import RunConfig, load_toml
    from fedlearn.runs import atomic_write

    source = args.run_dir / "model.he.safetensors"
    if not source.is_file():
        raise ConfigError([f"{source} does not exist: is {args.run_dir} the directory of a finished privacy=he run?"])
    out = args.out or args.run_dir / "model.safetensors"
    if out.exists():
        raise ConfigError([f"{out} already exists; remove it or choose another --out"])
    config = RunConfig.from_flat(load_toml(args.run_dir / "config.toml"))
    template = {k: v.numpy() for k, v in strategies.initial_state(config).items()}
    try:
        arrays = he.decrypt_saved_model(source, HEKey.load(args.key, secret=True), template)
    except HEKeyError:
        raise
    except (KeyError, ValueError) as exc:
        raise ConfigError([f"{source} is damaged ({exc})"]) from None
    atomic_write(out, save({k: v for k, v in arrays.items()}, metadata={"run_id": args.run_dir.name, "model": config.model}))
    print(out)
    return 0
