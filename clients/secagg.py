"""A client's side of secure aggregation (privacy=secagg): each function answers one stage
(see fedlearn.secagg) with the records of its reply. The client's secrets stay in its node's
private state (``context.state``) between stages and are replaced each round; nothing secret
leaves the node except Shamir shares sealed for one neighbour each.

The node's identity key (the one access control enrolled) signs its round keys and the survivor
set; the node's access policy, when it has one, says which peers' identities it accepts."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.identity import node_policy, signing_key
from clients.privacy import ClientHalf
from crypto.digest import sha256_hex
from crypto.secagg_protocol import Advertisement, ClientSession
from fedlearn.access import AccessPolicy
from fedlearn.config import RunConfig
from fedlearn.encoding import FixedPointCodec
from fedlearn.messages import (
    NODE_RECORD,
    NUM_EXAMPLES_KEY,
    PARTITION_KEY,
    SECAGG_RECORD,
)
from fedlearn.secagg import (
    ADVERTISE,
    CONSISTENCY,
    MASKED_ARRAY,
    SESSION_STATE,
    SHARE,
    UNMASK,
    RoundPlan,
    advertised_partitions,
    advertisement_record,
    advertisements_from_record,
    round_context,
)


def _request(msg: Message) -> ConfigRecord:
    if SECAGG_RECORD not in msg.content:
        raise ValueError("a secure-aggregation request without its secagg record")
    return msg.content[SECAGG_RECORD]


def _session(msg: Message, state: RecordDict) -> ClientSession:
    """This round's session; refuses requests for another round (or a node that missed stage 1)."""
    round_id = str(_request(msg)["round-id"])
    if SESSION_STATE not in state or state[SESSION_STATE].get("round-id") != round_id:
        raise ValueError(f"no secure-aggregation session for round id {round_id}: this node did not advertise keys for it")
    return ClientSession.from_state(state[SESSION_STATE])


def _keep(session: ClientSession, state: RecordDict, round_id: str, **extra) -> None:
    kept = dict(state[SESSION_STATE]) if SESSION_STATE in state else {}
    state[SESSION_STATE] = ConfigRecord({**kept, **session.to_state(), "round-id": round_id, **extra})


def advertise(msg: Message, state: RecordDict, identity) -> dict:
    """Stage 1: fresh keys for this round; the public halves, signed by ``identity``, go to the server."""
    request = _request(msg)
    threshold, bits, length = int(request["threshold"]), int(request["bits"]), int(request["length"])
    if threshold < 2:
        raise ValueError(f"threshold {threshold}: one share would reveal a secret; refusing to take part")
    context = round_context(str(request["round-id"]), int(request["server-round"]))
    session = ClientSession(msg.metadata.dst_node_id, threshold, bits, length, context)
    state[SESSION_STATE] = ConfigRecord({**session.to_state(), "round-id": str(request["round-id"])})
    return {SECAGG_RECORD: ConfigRecord(advertisement_record(session.advertise(identity)))}


def unenrolled(policy: AccessPolicy, ads: dict[int, Advertisement], partitions: dict[int, int]) -> str | None:
    """Why one of the advertised identities may not train under ``policy`` (None: all may);
    ``partitions`` name the key a simulated node must hold."""
    for ad in ads.values():
        # A key's fingerprint is the SHA-256 of its raw bytes.
        refusal = policy.refusal(sha256_hex(ad.identity), "trainer", partitions.get(ad.node))
        if refusal:
            return f"node {ad.node}'s advertisement: {refusal}"
    return None


def share(msg: Message, state: RecordDict, config: RunConfig, min_threshold: int = 0, policy: AccessPolicy | None = None) -> dict:
    """Stage 2: Shamir shares of this round's secrets, sealed for each neighbour. The threshold
    must meet the run's rule and the node's own floor (``min_threshold``, its node config); every
    advertised identity must be enrolled in ``policy`` (the node's own, when it holds one)."""
    request = _request(msg)
    session = _session(msg, state)
    ads = advertisements_from_record(request)
    floor = max(config.secagg_threshold_for(len(ads)), min_threshold)  # a neighbourhood under the floor: refused too
    if session.threshold < floor:
        raise ValueError(
            f"threshold {session.threshold} is below {floor} for {len(ads)} clients (the run's rule and "
            "this node's secagg-min-threshold): the server could collect both secrets of one client; refusing to share"
        )
    refusal = unenrolled(policy, ads, advertised_partitions(request)) if policy is not None else None
    if refusal:
        raise ValueError(f"{refusal}: refusing to share")
    sealed = session.share(ads, config.secagg_neighbours)
    _keep(session, state, str(request["round-id"]))
    ids = sorted(sealed)
    return {SECAGG_RECORD: ConfigRecord({"ids": ids, "sealed": [sealed[j] for j in ids]})}


def masked_update(msg: Message, state: RecordDict, local: dict[str, np.ndarray], num_examples: int) -> dict:
    """Stage 3: the trained model, weighted, encoded and masked (the records of the training reply)."""
    request = _request(msg)
    plan = RoundPlan.from_record(request)
    session = _session(msg, state)
    if num_examples > plan.weight_cap:
        raise ValueError(f"this node trained on {num_examples} examples but told the server {plan.weight_cap} at most")
    holders = [int(j) for j in request["holders"]]
    if len(request["sealed"]) != len(holders):
        raise ValueError("the secagg plan has a different number of sealed shares than holders")
    weight = num_examples / plan.weight_cap
    encoded, clipped = FixedPointCodec(local).encode(local, weight, plan)
    masked = session.mask(encoded, holders)
    _keep(session, state, plan.round_id, **{"sealed-ids": holders, "sealed": [bytes(s) for s in request["sealed"]]})
    return {
        "arrays": ArrayRecord({MASKED_ARRAY: Array(masked)}),
        SECAGG_RECORD: ConfigRecord({"weight": weight, "clipped": clipped}),
    }


def sign_survivors(msg: Message, state: RecordDict, identity) -> dict:
    """Stage 4 (consistency check): this node's signature over the survivor set, once a round."""
    request = _request(msg)
    session = _session(msg, state)
    signature = session.sign_survivors([int(j) for j in request["survivors"]], identity)
    _keep(session, state, str(request["round-id"]))
    return {SECAGG_RECORD: ConfigRecord({"sig": signature})}


def unmask(msg: Message, state: RecordDict) -> dict:
    """Stage 5: for each neighbour, the share of its self-mask seed if it is in the survivor set
    this node signed, of its mask key if not, never both; only with enough neighbours'
    signatures over that same set. The session ends here."""
    request = _request(msg)
    session = _session(msg, state)
    kept = state[SESSION_STATE]
    if "sealed" not in kept:
        raise ValueError("this node sent no masked input in this round: nothing to unmask")
    sealed = {int(j): bytes(s) for j, s in zip(kept["sealed-ids"], kept["sealed"])}
    signatures = {int(j): bytes(s) for j, s in zip(request["signers"], request["signatures"], strict=True)}
    revealed = session.unmask(sealed, signatures)
    del state[SESSION_STATE]
    ids = sorted(revealed)
    return {SECAGG_RECORD: ConfigRecord({"ids": ids, "kinds": [revealed[j][0] for j in ids], "shares": [revealed[j][1] for j in ids]})}


def _identity(msg: Message, context: Context, task):
    """The node's identity key: secure aggregation signs with it, so it needs access control's challenge."""
    key = signing_key(msg, context, task)
    if key is None:
        raise ValueError("privacy=secagg signs its round keys with the node's identity, but the request carries no "
                         "access-control challenge: run it under fedlearn's ServerApp")
    return key


def _advertise(msg: Message, context: Context, task) -> dict:
    """Stage 1, with how many examples the node trains on (the server sizes the weights by the largest)."""
    node = ConfigRecord({PARTITION_KEY: task.partition_id, NUM_EXAMPLES_KEY: len(task.split)})
    return {**advertise(msg, context.state, _identity(msg, context, task)), NODE_RECORD: node}


def _share(msg: Message, context: Context, task) -> dict:
    policy = node_policy(context, task.config)
    return share(msg, context.state, task.config, task.floors.secagg_min_threshold, policy)


def _encode(msg: Message, context: Context, task, received, state: dict, num_examples: int) -> dict:
    return masked_update(msg, context.state, {k: v.numpy() for k, v in state.items()}, num_examples)


CLIENT = ClientHalf(encode=_encode, stages={
    ADVERTISE: _advertise,
    SHARE: _share,
    CONSISTENCY: lambda msg, context, task: sign_survivors(msg, context.state, _identity(msg, context, task)),
    UNMASK: lambda msg, context, task: unmask(msg, context.state),
})
