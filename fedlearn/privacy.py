"""The privacy modes by name: the one place that maps ``privacy=`` to its parts.

A mode is a pair, as Flower pairs ``DifferentialPrivacyServerSideFixedClipping`` with
``fixedclipping_mod``: a server wrapper (a ``server.privacy.PrivacyStrategy``) around the Flower
strategy, and a client half (``clients.privacy.ClientHalf``) that reads the global state, encodes
the node's update and answers the mode's own stages.
Both are named as ``"module:attribute"`` and loaded when a run uses them, so that reading a
config imports neither Flower nor a mode's cryptography; a test may register objects instead.
The traits say what the server can see; the config checks that follow from them are generic,
those peculiar to one mode live in its own module (``checks``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from fedlearn import secagg, threshold
from fedlearn.registry import Ref, Registry, load


@dataclass(frozen=True)
class PrivacyMode:
    name: str
    server: Ref  # its PrivacyStrategy subclass
    client: Ref  # its client half (clients.privacy.ClientHalf): decode, encode, its own stages
    checks: Ref | None = None  # (config) -> problems peculiar to this mode
    sees_updates: bool = False  # the server sees each client's update in clear
    sees_aggregate: bool = True  # the server sees the aggregate, so the global model, in clear
    stages: Mapping[str, str] = field(default_factory=dict)  # dropout-stage name -> message type of its own stages
    roles: Mapping[str, str] = field(default_factory=dict)  # message type -> role its replies need
    keys: tuple[str, ...] = ()  # config keys that apply to this mode only
    summary: str = ""

    def __reduce__(self):
        """Unpickling a mode registers it: Ray ships the ClientApp, and the modes it knows, to its
        workers, so a mode registered outside fedlearn (a user's, a test's) exists there too."""
        return _restore, ({f.name: getattr(self, f.name) for f in fields(self)},)

    def server_class(self) -> type:
        return load(self.server)

    def client_half(self):
        return load(self.client)

    def problems(self, config) -> list[str]:
        return list(load(self.checks)(config)) if self.checks else []


_MODES = Registry()
register, unregister, names, modes, get = _MODES.register, _MODES.unregister, _MODES.names, _MODES.entries, _MODES.get


def _restore(values: dict) -> PrivacyMode:
    return _MODES.restore(PrivacyMode(**values))


def role_for(message_type: str) -> str | None:
    """The role a mode's own stage needs of the node that answers it (None: not a mode's stage)."""
    for mode in _MODES.entries():
        if message_type in mode.roles:
            return mode.roles[message_type]
    return None


register(PrivacyMode(
    "plain", server="server.privacy:PrivacyStrategy", client="clients.privacy:PLAIN", sees_updates=True,
    summary="updates travel in clear (the reference the other modes are tested against)",
))
register(PrivacyMode(
    "he", server="server.he:HEStrategy", client="clients.he:CLIENT", checks="fedlearn.he:config_problems",
    sees_aggregate=False, keys=("he-public", "he-secret"),
    summary="the server adds ciphertexts it cannot decrypt; clients hold the key",
))
register(PrivacyMode(
    "secagg", server="server.secagg:SecAggStrategy", client="clients.secagg:CLIENT",
    checks="fedlearn.secagg:config_problems",
    stages={"advertise": secagg.ADVERTISE, "share": secagg.SHARE, "consistency": secagg.CONSISTENCY, "unmask": secagg.UNMASK},
    summary="pairwise-masked secure aggregation: the server sees only the sum",
))
register(PrivacyMode(
    "he-threshold", server="server.threshold:ThresholdStrategy", client="clients.threshold:CLIENT",
    checks="fedlearn.threshold:config_problems", stages={"decrypt": threshold.DECRYPT},
    roles={message_type: "keyholder" for message_type in threshold.MESSAGE_TYPES},
    summary="threshold HE: a quorum of key holders decrypts only the sum",
))
