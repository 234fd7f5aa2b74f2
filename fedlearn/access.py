"""Who may take part: the access policy, and the statements nodes and operators sign.

A policy is a TOML file the operator keeps (``fedlearn keys enroll`` / ``revoke`` edit it)::

    [[node]]
    name = "hospital-a"
    key = "<base64 Ed25519 public key>"
    fingerprint = "<sha256 of the key, hex>"   # written for readers, checked on load
    roles = ["trainer", "evaluator"]
    revoked = ""                               # a reason once revoked; revoked keys stay listed

    [[operator]]
    name = "alice"
    key = "..."
    fingerprint = "..."

A simulation's policy can instead stand for nodes 0..N-1 in one table, each node's key derived
from one seed (``signing.derived(seed, "node-<i>")``), so that 100,000 simulated clients need
no key file each::

    [simulated]
    nodes = 100000
    roles = ["trainer", "evaluator"]
    seed = "keys/nodes.seed"                   # beside the policy; whoever reads it holds every key
    seed-sha256 = "<sha256 of the seed file>"  # checked on load

Signatures are over canonical JSON statements with a purpose tag, so a signature made for one
purpose (authorising a run) can never be presented as another (an update).
"""

from __future__ import annotations

import base64
import secrets
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import tomli_w

from crypto import signing
from crypto.digest import canonical_json, sha256_hex
from crypto.files import write_new
from fedlearn import privacy
from fedlearn.config import RunConfig, read_toml
from fedlearn.errors import AccessDenied, ConfigError
from fedlearn.messages import NUM_EXAMPLES_QUERY

ROLES = ("trainer", "evaluator", "keyholder")
NODE_KEY_NAME = "node-{}"  # node-keys-dir holds node-<partition-id>.key (or nodes.seed, simulated)
SEED_FILE = "nodes.seed"
# By message type, else by category ("train.secagg_share" is a trainer's too).
ROLE_FOR_MESSAGE = {"train": "trainer", "evaluate": "evaluator", NUM_EXAMPLES_QUERY: "trainer"}
UPDATE_PURPOSE = "fedlearn-update-v1"
RUN_PURPOSE = "fedlearn-run-v1"
# Config keys left out of the digest an operator signs: the signature cannot sign itself.
UNSIGNED_KEYS = ("run-signature",)


@dataclass(frozen=True)
class Member:
    name: str
    key: str  # base64 of the raw 32-byte Ed25519 public key
    roles: tuple[str, ...] = ()
    revoked: str = ""

    @cached_property
    def public_key(self):
        return signing.public_from_b64(self.key)

    @cached_property
    def fingerprint(self) -> str:
        return signing.fingerprint(self.public_key)

    def to_toml(self, with_roles: bool) -> dict[str, Any]:
        table: dict[str, Any] = {"name": self.name, "key": self.key, "fingerprint": self.fingerprint}
        if with_roles:
            table["roles"] = list(self.roles)
            table["revoked"] = self.revoked
        return table


@dataclass(frozen=True)
class SimulatedNodes:
    """Nodes ``node-0`` .. ``node-<count-1>`` of a simulation, with keys derived from ``seed``:
    a node is known by the partition it reports, and its key must be that partition's."""

    count: int
    roles: tuple[str, ...]
    seed_file: str  # as written in the policy: relative to the policy's directory, or absolute
    seed: bytes = field(repr=False)

    def member(self, partition: int) -> Member | None:
        if not 0 <= partition < self.count:
            return None
        name = NODE_KEY_NAME.format(partition)
        return Member(name=name, key=signing.public_b64(self.key(partition).public_key()), roles=self.roles)

    def key(self, partition: int):
        return signing.derived(self.seed, NODE_KEY_NAME.format(partition))

    def to_toml(self) -> dict[str, Any]:
        return {"nodes": self.count, "roles": list(self.roles), "seed": self.seed_file, "seed-sha256": sha256_hex(self.seed)}


@dataclass
class AccessPolicy:
    """Edit through enroll/revoke, which keep the fingerprint index (a lookup per reply) current."""

    nodes: list[Member] = field(default_factory=list)
    operators: list[Member] = field(default_factory=list)
    simulated: SimulatedNodes | None = None

    def __post_init__(self) -> None:
        self._reindex()
        self._derived: dict[int, Member | None] = {}  # the simulated members met so far (bounded)

    def _reindex(self) -> None:
        self._by_fingerprint = {m.fingerprint: m for m in self.nodes if m.key}

    # -- files ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> AccessPolicy:
        path = Path(path)
        table = read_toml(path, "access policy", missing=f"create it with `fedlearn keys enroll --policy {path} ...`")
        problems: list[str] = []
        unknown = set(table) - {"node", "operator", "simulated"}
        if unknown:
            problems.append(
                f"{path}: unknown table(s) {', '.join(sorted(unknown))}; a policy has [[node]], [[operator]] and [simulated]"
            )
        policy = cls(
            nodes=[_member(path, "node", i, t, problems) for i, t in enumerate(table.get("node", []))],
            operators=[_member(path, "operator", i, t, problems) for i, t in enumerate(table.get("operator", []))],
            simulated=_simulated(path, table["simulated"], problems) if "simulated" in table else None,
        )
        problems += policy._conflicts(path)
        if problems:
            raise ConfigError(problems)
        return policy

    def save(self, path: Path) -> None:
        from fedlearn.runs import atomic_write

        table: dict[str, Any] = {
            "node": [m.to_toml(with_roles=True) for m in self.nodes],
            "operator": [m.to_toml(with_roles=False) for m in self.operators],
        }
        if self.simulated:
            table["simulated"] = self.simulated.to_toml()
        header = b"# fedlearn access policy: edit with `fedlearn keys enroll` / `fedlearn keys revoke`\n"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), header + tomli_w.dumps(table).encode())

    def digest(self) -> str:
        """SHA-256 of the policy's content (not its formatting), for the audit log."""
        content: dict[str, Any] = {
            "node": [m.to_toml(with_roles=True) for m in self.nodes],
            "operator": [m.to_toml(with_roles=False) for m in self.operators],
        }
        if self.simulated:  # the seed by its digest: the same nodes wherever the file lies
            content["simulated"] = {k: v for k, v in self.simulated.to_toml().items() if k != "seed"}
        return sha256_hex(canonical_json(content))

    # -- edits ---------------------------------------------------------------------
    def enroll(self, name: str, public_key, roles: tuple[str, ...] = (), *, operator: bool = False) -> Member:
        member = Member(name=name, key=signing.public_b64(public_key), roles=tuple(roles))
        problems = [f"unknown role {r!r}: choose from {', '.join(ROLES)}" for r in roles if r not in ROLES]
        if not operator and not roles:
            problems.append(f"node {name!r} needs at least one role ({', '.join(ROLES)})")
        for other in self.nodes + self.operators:
            if other.name == name:
                problems.append(f"the name {name!r} is already enrolled: pick another name")
            if other.key == member.key:
                problems.append(f"this key is already enrolled as {other.name!r} (fingerprint {member.fingerprint})")
        if problems:
            raise AccessDenied("cannot enroll: " + "; ".join(problems))
        (self.operators if operator else self.nodes).append(member)
        self._reindex()
        return member

    def revoke(self, who: str, reason: str) -> Member:
        """Revoke a node by name or fingerprint (or a unique fingerprint prefix of 8+ characters)."""
        matches = [
            i for i, m in enumerate(self.nodes)
            if who == m.name or (len(who) >= 8 and m.fingerprint.startswith(who.lower()))
        ]
        if not matches and self.simulated and who.startswith("node-"):
            raise AccessDenied(
                f"cannot revoke {who!r}: it is one of the {self.simulated.count} simulated nodes, whose keys derive from one "
                "seed; a simulation's policy is regenerated for every run"
            )
        if len(matches) != 1:
            known = ", ".join(m.name for m in self.nodes) or "none"
            what = "no enrolled node" if not matches else f"{len(matches)} nodes"
            raise AccessDenied(f"cannot revoke {who!r}: {what} match (enrolled nodes: {known})")
        index = matches[0]
        self.nodes[index] = replace(self.nodes[index], revoked=reason or "revoked")
        self._reindex()
        return self.nodes[index]

    # -- decisions -----------------------------------------------------------------
    def node(self, fingerprint: str, partition: int | None = None) -> Member | None:
        """The enrolled node with this key; for a simulated node, the key must be the one derived
        for the ``partition`` it reports (one derivation, however many nodes there are)."""
        member = self._by_fingerprint.get(fingerprint)
        if member is None and self.simulated is not None and partition is not None:
            if partition not in self._derived:
                if len(self._derived) >= 4096:
                    self._derived.clear()
                self._derived[partition] = self.simulated.member(partition)
            derived = self._derived[partition]
            member = derived if derived is not None and derived.fingerprint == fingerprint else None
        return member

    def refusal(self, fingerprint: str, role: str, partition: int | None = None) -> str | None:
        """Why the key may not act in ``role``, or None when it may."""
        member = self.node(fingerprint, partition)
        if member is None:
            return f"unknown key {fingerprint[:16]}: not enrolled in the access policy"
        if member.revoked:
            return f"revoked key of {member.name!r} ({member.revoked})"
        if role not in member.roles:
            return f"role: {member.name!r} may not act as {role} (roles: {', '.join(member.roles) or 'none'})"
        return None

    def authorising_operator(self, config: RunConfig, signature_b64: str) -> Member:
        """The operator whose key signed ``config``'s digest; AccessDenied says why none did."""
        if not self.operators:
            raise AccessDenied("the access policy lists no operator keys: enroll one with `fedlearn keys enroll --operator`")
        if not signature_b64:
            raise AccessDenied(
                "the run has no run-signature: an operator signs the config with "
                "`fedlearn keys authorize --key OPERATOR.key --run-config ...` and passes run-signature=..."
            )
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except ValueError:
            raise AccessDenied("run-signature is not base64: copy it exactly as `fedlearn keys authorize` printed it") from None
        statement = run_statement(config, self)
        for operator in self.operators:
            if signing.verify(operator.public_key, signature, statement):
                return operator
        raise AccessDenied(
            f"run-signature does not verify for config digest {run_digest(config)[:16]} under any of the "
            f"{len(self.operators)} operator keys: the config or the policy (digest {self.digest()[:16]}) changed "
            "after signing, or the signer is not an enrolled operator"
        )

    def _conflicts(self, path: Path) -> list[str]:
        problems = []
        members = self.nodes + self.operators
        for attr in ("name", "key"):
            counts = Counter(getattr(m, attr) for m in members)
            for value in sorted(v for v, n in counts.items() if n > 1):
                shown = value if attr == "name" else f"with fingerprint {signing.fingerprint(signing.public_from_b64(value))[:16]}"
                problems.append(f"{path}: {attr} {shown} appears more than once")
        return problems


def _member(path: Path, kind: str, index: int, table: Any, problems: list[str]) -> Member:
    where = f"{path}: [[{kind}]] #{index + 1}"
    allowed = {"name", "key", "fingerprint"} | ({"roles", "revoked"} if kind == "node" else set())
    if not isinstance(table, dict):
        problems.append(f"{where} is not a table")
        return Member(name="?", key="")
    name = table.get("name", "")
    if not isinstance(name, str) or not name:
        problems.append(f"{where} has no name")
    unknown = set(table) - allowed
    if unknown:
        problems.append(f"{where} ({name}): unknown field(s) {', '.join(sorted(unknown))}")
    roles = table.get("roles", [])
    if not isinstance(roles, list) or any(r not in ROLES for r in roles):
        problems.append(f"{where} ({name}): roles must be a list from {', '.join(ROLES)}, got {roles!r}")
        roles = []
    member = Member(name=str(name), key=str(table.get("key", "")), roles=tuple(roles), revoked=str(table.get("revoked", "")))
    try:
        fingerprint = member.fingerprint
    except signing.KeyFileError as exc:
        problems.append(f"{where} ({name}): key {exc}")
        return replace(member, key="")
    written = table.get("fingerprint")
    if written is not None and written != fingerprint:
        problems.append(f"{where} ({name}): fingerprint does not match its key (was the key edited?)")
    return member


def _simulated(path: Path, table: Any, problems: list[str]) -> SimulatedNodes | None:
    where = f"{path}: [simulated]"
    if not isinstance(table, dict):
        problems.append(f"{where} is not a table")
        return None
    unknown = set(table) - {"nodes", "roles", "seed", "seed-sha256"}
    count, roles, seed_file = table.get("nodes"), table.get("roles", []), table.get("seed", "")
    before = len(problems)
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        problems.append(f"{where}: nodes must be a whole number >= 1, got {count!r}")
    if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
        problems.append(f"{where}: roles must be a non-empty list from {', '.join(ROLES)}, got {roles!r}")
    if not isinstance(seed_file, str) or not seed_file:
        problems.append(f"{where}: seed must name the seed file")
    if len(problems) > before:
        return None
    seed_path = (path.parent / seed_file).expanduser()
    try:
        seed = seed_path.read_bytes()
    except OSError as exc:
        problems.append(f"{where}: cannot read the seed {seed_path}: {exc.strerror or exc}")
        return None
    if sha256_hex(seed) != table.get("seed-sha256"):
        problems.append(f"{where}: the seed {seed_path} does not match seed-sha256 (another run's seed, or edited)")
        return None
    if len(seed) < 32:
        problems.append(f"{where}: the seed {seed_path} has {len(seed)} bytes, at least 32 are needed")
        return None
    return SimulatedNodes(count, tuple(roles), seed_file, seed)


# -- signed statements ---------------------------------------------------------------
def run_digest(config: RunConfig) -> str:
    return config.digest(exclude=UNSIGNED_KEYS)


def run_statement(config: RunConfig, policy: AccessPolicy) -> bytes:
    """What an operator signs: this config, under this policy (a policy edited afterwards, e.g.
    a node enrolled by someone else, voids the authorisation)."""
    return canonical_json({"purpose": RUN_PURPOSE, "config": run_digest(config), "policy": policy.digest()})


def sign_run(config: RunConfig, policy: AccessPolicy, operator_key) -> str:
    """The run-signature value that authorises ``config`` under ``policy`` (base64)."""
    return base64.b64encode(signing.sign(operator_key, run_statement(config, policy))).decode()


def role_for(message_type: str) -> str | None:
    """The role a reply of this type needs (None: not signed, e.g. plain queries)."""
    role = privacy.role_for(message_type)  # a mode's own stages (he-threshold's key holders)
    if role is not None:
        return role
    return ROLE_FOR_MESSAGE.get(message_type) or ROLE_FOR_MESSAGE.get(message_type.split(".", 1)[0])


def update_statement(run_id: str, server_round: int, nonce: str, kind: str, payload: str) -> bytes:
    return canonical_json(
        {"purpose": UPDATE_PURPOSE, "run": run_id, "round": server_round, "nonce": nonce, "kind": kind, "payload": payload}
    )


# -- simulation ----------------------------------------------------------------------


def provision_simulation(directory: Path, config: RunConfig, *, key_files: bool = False) -> tuple[Path, RunConfig]:
    """Keys and a policy for a simulated federation, so the default job stays one command.

    Writes ``keys/nodes.seed`` (every node's key derives from it: one file and one policy table
    however many clients) or, with ``key_files`` (nodes as separate processes, each given its own
    key), ``keys/node-<i>.key`` for every partition; and an operator key. Returns the policy path
    and ``config`` pointing at it and signed by that operator (the same checks as a deployment
    then apply).
    """
    keys = directory / "keys"
    policy = AccessPolicy()
    if key_files:
        for partition in range(config.num_clients):
            name = NODE_KEY_NAME.format(partition)
            _, _, key = signing.write_keypair(keys, name)
            policy.enroll(name, key.public_key(), ROLES)
    else:
        seed = secrets.token_bytes(32)
        write_new(keys / SEED_FILE, seed, private=True)
        policy.simulated = SimulatedNodes(config.num_clients, ROLES, f"keys/{SEED_FILE}", seed)
    _, _, operator = signing.write_keypair(keys, "operator")
    policy.enroll("simulation-operator", operator.public_key(), operator=True)
    policy_path = directory / "policy.toml"
    policy.save(policy_path)
    config = config.replace(access_policy=str(policy_path), node_keys_dir=str(keys))
    return policy_path, config.replace(run_signature=sign_run(config, policy, operator))
