"""`fedlearn keys ...` and `fedlearn audit ...`: identities, the access policy, and the audit log."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crypto import signing
from fedlearn.errors import ConfigError, FedlearnError, PathError
from simulations.argtypes import file_stem, hex_prefix, out_directory


def add_commands(sub, config_from_args):
    keys = sub.add_parser("keys", help="Ed25519 identities and the access policy")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    generate = keys_sub.add_parser("generate", help="create a key pair: NAME.key (mode 0600) and NAME.pub")
    generate.add_argument("--out", required=True, type=out_directory, help="directory for the key files")
    generate.add_argument("--name", required=True, type=file_stem, help="file name stem, e.g. the node or operator name")
    generate.add_argument("--supernode-auth", action="store_true",
                          help="also write NAME.auth.key/.auth.pub: the EC P-384 pair Flower's SuperNode authentication uses")
    generate.set_defaults(func=_generate)

    enroll = keys_sub.add_parser("enroll", help="add a node (or operator) public key to a policy file")
    enroll.add_argument("--policy", required=True, type=Path, help="policy TOML (created if missing)")
    enroll.add_argument("--name", required=True, help="name shown in audit records")
    enroll.add_argument("--pub", required=True, type=Path, help="the .pub file from `fedlearn keys generate`")
    enroll.add_argument("--role", action="append", choices=["trainer", "evaluator", "keyholder"],
                        help="node role; repeat for several (default: trainer and evaluator; keyholder: may join "
                             "the he-threshold decryption committee)")
    enroll.add_argument("--operator", action="store_true", help="enroll an operator allowed to start runs")
    enroll.set_defaults(func=_enroll)

    revoke = keys_sub.add_parser("revoke", help="revoke a node's key (it stays listed, marked revoked)")
    revoke.add_argument("--policy", required=True, type=Path)
    revoke.add_argument("who", help="node name or key fingerprint (8+ leading hex digits)")
    revoke.add_argument("--reason", default="revoked by operator", help="recorded in the policy")
    revoke.set_defaults(func=_revoke)

    show = keys_sub.add_parser("list", help="print a policy's nodes and operators with fingerprints")
    show.add_argument("--policy", required=True, type=Path)
    show.set_defaults(func=_list)

    authorize = keys_sub.add_parser(
        "authorize", help="sign a run config with an operator key; prints the run-signature to pass to the run"
    )
    authorize.add_argument("--key", required=True, type=Path, help="the operator's private key")
    authorize.add_argument("--preset", help="as for `fedlearn simulate`")
    authorize.add_argument("--run-config", help="as for `fedlearn simulate`; include access-policy=...")
    authorize.add_argument("--out", help="as for `fedlearn simulate`")
    authorize.set_defaults(func=lambda args: _authorize(args, config_from_args))

    audit = sub.add_parser("audit", help="verify and read audit logs")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check every record's chain and signature (exit 0 ok, 1 bad, 2 usage)")
    verify.add_argument("log", type=Path, help="audit.jsonl, or the run directory holding it")
    verify.add_argument("--key", required=True, type=Path, help="the server's audit public key (audit.pub)")
    verify.add_argument("--model", type=Path, help="also check that this model.safetensors is the logged final model")
    verify.add_argument("--allow-incomplete", action="store_true",
                        help="accept a log that does not end its run: a live run, or one that failed")
    verify.add_argument("--head", type=hex_prefix,
                        help="the log's head (SHA-256 of its last record, 16+ hex digits) as published out of band")
    verify.set_defaults(func=_verify)

    show_log = audit_sub.add_parser("show", help="print a log as a per-round table (does not verify)")
    show_log.add_argument("log", type=Path, help="audit.jsonl, or the run directory holding it")
    show_log.set_defaults(func=_show)

    digest = audit_sub.add_parser("digest", help="print the digest of a saved model, as the audit log records it")
    digest.add_argument("model", type=Path, help="model.safetensors")
    digest.set_defaults(func=_digest)
    return keys_sub


def _generate(args: argparse.Namespace) -> int:
    private, public, key = signing.write_keypair(args.out, args.name)
    print(f"private key {private} (mode 0600: keep it secret)")
    print(f"public key  {public}")
    print(f"fingerprint {signing.fingerprint(key)}")
    if args.supernode_auth:
        from crypto.certs import generate_supernode_auth

        auth = generate_supernode_auth(args.out, args.name)
        print(f"SuperNode auth key {auth.private_key} (for flower-supernode --auth-supernode-private-key)")
        print(f"SuperNode auth pub {auth.public_key} (for flwr supernode register)")
    return 0


def _policy_or_new(path: Path):
    from fedlearn.access import AccessPolicy

    return AccessPolicy.load(path) if path.exists() else AccessPolicy()


def _enroll(args: argparse.Namespace) -> int:
    if args.operator and args.role:
        raise ConfigError(["--role applies to nodes; an --operator has no role"])
    policy = _policy_or_new(args.policy)
    roles = () if args.operator else tuple(dict.fromkeys(args.role or ["trainer", "evaluator"]))
    member = policy.enroll(args.name, signing.load_public(args.pub), roles, operator=args.operator)
    policy.save(args.policy)
    what = "operator" if args.operator else f"node ({', '.join(roles)})"
    print(f"enrolled {what} {member.name} {member.fingerprint} in {args.policy}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from fedlearn.access import AccessPolicy

    policy = AccessPolicy.load(args.policy)
    member = policy.revoke(args.who, args.reason)
    policy.save(args.policy)
    print(f"revoked {member.name} {member.fingerprint} ({member.revoked}) in {args.policy}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from fedlearn.access import AccessPolicy

    policy = AccessPolicy.load(args.policy)
    for member in policy.nodes:
        state = f"REVOKED ({member.revoked})" if member.revoked else ",".join(member.roles)
        print(f"node      {member.fingerprint}  {member.name}  {state}")
    if policy.simulated:
        sim = policy.simulated
        print(f"simulated node-0 .. node-{sim.count - 1}  keys derived from {sim.seed_file}  {','.join(sim.roles)}")
    for member in policy.operators:
        print(f"operator  {member.fingerprint}  {member.name}")
    print(f"policy digest {policy.digest()}")
    return 0


def _authorize(args: argparse.Namespace, config_from_args) -> int:
    from fedlearn.access import AccessPolicy, run_digest, sign_run

    config = config_from_args(args.preset, args.run_config, args.out)
    if not config.access_policy:
        raise ConfigError(["a signed run needs access-policy=PATH in --run-config (the policy the server will use)"])
    key = signing.load_private(args.key)
    policy = AccessPolicy.load(Path(config.access_policy))
    if signing.fingerprint(key) not in {m.fingerprint for m in policy.operators}:
        raise ConfigError([
            f"{args.key} (fingerprint {signing.fingerprint(key)[:16]}) is not an operator in {config.access_policy}: "
            "enroll its .pub with `fedlearn keys enroll --operator`"
        ])
    signature = sign_run(config, policy, key)
    operator = policy.authorising_operator(config.replace(run_signature=signature), signature)
    print(f"config digest {run_digest(config)} signed by operator {operator.name}", file=sys.stderr)
    print(f"run-signature='{signature}'")  # quoted: base64 is a TOML string for flwr run too
    return 0


def _verify(args: argparse.Namespace) -> int:
    from fedlearn import audit

    args.log = _audit_log(args.log)
    verdict = audit.verify(args.log, signing.load_public(args.key), allow_incomplete=args.allow_incomplete,
                          head=args.head or "")
    if verdict.ok and args.model:
        verdict = _check_model(verdict, args.model)
    print(verdict.summary())
    return 0 if verdict.ok else 1


def _audit_log(path: Path) -> Path:
    """The log itself, or the audit.jsonl of a run directory."""
    if path.is_dir():
        if not (path / "audit.jsonl").is_file():
            raise PathError(f"{path} is a directory without audit.jsonl: give a run directory or its audit.jsonl")
        return path / "audit.jsonl"
    if not path.is_file():
        raise PathError(f"audit log {path} " + ("is not a regular file" if path.exists() else "does not exist"))
    return path


def _model_digest(model: Path) -> str:
    from crypto.digest import arrays_digest
    from fedlearn.runs import load_model

    if not model.is_file():
        raise ConfigError([f"model file {model} does not exist"])
    try:
        return arrays_digest(load_model(model))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ConfigError([f"{model} is not a readable safetensors model ({exc})"]) from None


def _check_model(verdict, model: Path):
    logged = next((r["data"].get("final_model") for r in reversed(verdict.events) if r["event"] == "run_end"), None)
    actual = _model_digest(model)
    if logged != actual:
        verdict.ok = False
        verdict.seq = verdict.events[-1]["seq"]
        verdict.reason = f"{model} has digest {actual[:16]}, the log's final model is {str(logged)[:16]}"
    return verdict


def _show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from fedlearn import audit

    log = _audit_log(args.log)
    records = [r for r in audit.read(log) if _displayable(r)]
    if not records:
        raise FedlearnError(f"{log} holds no audit record: it is not a fedlearn audit log (a run directory's audit.jsonl)")
    # Records are untrusted text (node names, reasons): printed as text, never as rich markup.
    console = Console(width=None if sys.stdout.isatty() else 160, markup=False, highlight=False, emoji=False)
    start = next((r for r in records if r["event"] in ("run_start", "run_refused")), None)
    if start:
        data = start["data"]
        operator = data.get("operator") if isinstance(data.get("operator"), dict) else {}
        config = data.get("config") if isinstance(data.get("config"), dict) else {}
        console.print(f"run {start.get('run_id')}  {start['event']}  operator {operator.get('name', '-')} "
                      f"{str(operator.get('fingerprint', ''))[:16]}  config {str(data.get('config_digest', ''))[:16]}  "
                      f"privacy {config.get('privacy', '-')}")
        if start["event"] == "run_refused":
            console.print(f"refused: {data.get('reason')}")
    table = Table("round", "sampled", "accepted", "rejected", "failed", "examples", "aggregate", "accuracy", "loss")
    for view in audit.rounds(records):
        cells = (view.round, view.sampled, len(view.accepted), "\n".join(view.rejected) or "0", view.failed,
                 view.examples, view.aggregate[:16], _fmt(view.accuracy), _fmt(view.loss))
        table.add_row(*(Text(str(cell)) for cell in cells))
    console.print(table)
    end = next((r for r in reversed(records) if r["event"] == "run_end"), None)
    console.print(f"run_end: {end['data'].get('status')}" if end else "no run_end record (live, crashed or truncated)")
    console.print(Text("not verified: run `fedlearn audit verify LOG --key audit.pub`", style="dim"))
    return 0


def _displayable(record: dict) -> bool:
    """A record of the shape `audit show` reads (it does not verify: any line may be anything)."""
    return (isinstance(record.get("seq"), int) and isinstance(record.get("event"), str)
            and isinstance(record.get("round", 0), int) and isinstance(record.get("data", {}), dict))


def _digest(args: argparse.Namespace) -> int:
    print(_model_digest(args.model))
    return 0


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"
