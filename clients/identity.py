"""A node's identity: the Ed25519 key access control enrolled it under, and the access policy it
judges its peers by. The ClientApp signs replies with the key; privacy modes that talk about
peers (secagg) sign their own statements with it and check peers' against the policy."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flwr.app import Context, Message

from crypto import signing
from fedlearn.access import NODE_KEY_NAME, SEED_FILE, AccessPolicy
from fedlearn.config import RunConfig
from fedlearn.errors import AccessDenied, ConfigError
from fedlearn.messages import AUTH_RECORD


def key_path(context: Context, config: RunConfig, partition_id: int) -> Path:
    if "node-key" in context.node_config:
        return Path(str(context.node_config["node-key"])).expanduser()
    if config.node_keys_dir:
        return Path(config.node_keys_dir) / f"{NODE_KEY_NAME.format(partition_id)}.key"
    raise ConfigError(
        [
            "this node has no signing key: create one with `fedlearn keys generate --out keys --name NAME`, "
            "have the operator enroll keys/NAME.pub (`fedlearn keys enroll`), and start the node with "
            "--node-config 'node-key=keys/NAME.key partition-id=I num-partitions=N'"
        ]
    )


@lru_cache(maxsize=64)
def _load_key(path: Path):
    try:
        return signing.load_private(path)
    except signing.KeyFileError as exc:
        raise ConfigError([f"node-key: {exc}"]) from None


def node_policy(context: Context, config: RunConfig) -> AccessPolicy | None:
    """The access policy the node judges its peers by: ``access-policy`` in its node config (a
    deployed node's own copy, which no server can change), else the run's (a simulation, where
    server and nodes share one machine and one operator); None when there is neither."""
    path = context.node_config.get("access-policy") or config.access_policy
    if not path:
        return None
    path = Path(str(path)).expanduser()
    try:
        stat = path.stat()
    except OSError as exc:
        raise ConfigError([f"access-policy {path}: {exc.strerror or exc}: give the policy file the operator distributed"]) from None
    return _load_policy(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _load_policy(path: Path, mtime_ns: int, size: int) -> AccessPolicy:
    """Loaded once per version of the file (its mtime and size are the cache key)."""
    return AccessPolicy.load(path)


def check_run_signature(config: RunConfig, policy: AccessPolicy) -> None:
    """Refuse (ConfigError) a run config that no operator enrolled in the node's own policy signed:
    a server cannot then change what the node runs (privacy mode, threshold, anything) behind
    the operator's back. Verified once per config and policy: every message of a run repeats it."""
    key = (config.digest(), policy.digest())
    if key in _AUTHORISED:
        return
    try:
        policy.authorising_operator(config, config.run_signature)
    except AccessDenied as exc:
        raise ConfigError([f"this node's access policy does not authorise the run config the server sent: {exc}"]) from None
    _AUTHORISED.add(key)


_AUTHORISED: set[tuple[str, str]] = set()  # (config digest, signature included; policy digest) verified


def signing_key(msg: Message, context: Context, task):
    """The node's key when the server sent a challenge to sign, else None: its key file, or in a
    simulation whose keys directory holds the nodes' seed, the key derived for its partition."""
    if AUTH_RECORD not in msg.content:
        return None
    return node_key(context, task.config, task.partition_id)


def node_key(context: Context, config: RunConfig, partition_id: int):
    """The node's Ed25519 key: its ``node-key`` file, else the one derived for its partition from
    the simulation's seed, else ``node-<partition-id>.key`` in node-keys-dir."""
    seed = Path(config.node_keys_dir) / SEED_FILE if config.node_keys_dir else None
    if "node-key" not in context.node_config and seed is not None and seed.is_file():
        return _derived_key(seed, partition_id)
    return _load_key(key_path(context, config, partition_id))


@lru_cache(maxsize=64)
def _derived_key(seed_path: Path, partition_id: int):
    try:
        return signing.derived(seed_path.read_bytes(), NODE_KEY_NAME.format(partition_id))
    except (OSError, signing.KeyFileError) as exc:
        raise ConfigError([f"node seed {seed_path}: {exc}"]) from None
