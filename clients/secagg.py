"""A client's side of secure aggregation (privacy=secagg): each function answers one stage
(see fedlearn.secagg) with the records of its reply. The client's secrets stay in its node's
private state (``context.state``) between stages and are replaced each round; nothing secret
leaves the node except Shamir shares sealed for one neighbour each."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.privacy import ClientHalf
from crypto.secagg_protocol import ClientSession
from fedlearn.config import RunConfig
from fedlearn.encoding import FixedPointCodec
from fedlearn.messages import NODE_RECORD, NUM_EXAMPLES_KEY, PARTITION_KEY, SECAGG_RECORD
from fedlearn.secagg import ADVERTISE, MASKED_ARRAY, SESSION_STATE, SHARE, UNMASK, RoundPlan, round_context


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
    state[SESSION_STATE] = ConfigRecord({**session.to_state(), "round-id": round_id, **extra})


def advertise(msg: Message, state: RecordDict) -> dict:
    """Stage 1: fresh keys for this round; the public halves go to the server."""
    request = _request(msg)
    threshold, bits, length = int(request["threshold"]), int(request["bits"]), int(request["length"])
    if threshold < 2:
        raise ValueError(f"threshold {threshold}: one share would reveal a secret; refusing to take part")
    context = round_context(str(request["round-id"]), int(request["server-round"]))
    session = ClientSession(msg.metadata.dst_node_id, threshold, bits, length, context)
    _keep(session, state, str(request["round-id"]))
    c_public, s_public = session.advertise()
    return {SECAGG_RECORD: ConfigRecord({"c-public": c_public, "s-public": s_public})}


def share(msg: Message, state: RecordDict, config: RunConfig, min_threshold: int = 0) -> dict:
    """Stage 2: Shamir shares of this round's secrets, sealed for each neighbour. The threshold
    must meet the run's rule and the node's own floor (``min_threshold``, its node config)."""
    request = _request(msg)
    session = _session(msg, state)
    ids = [int(j) for j in request["ids"]]
    publics = {j: (bytes(c), bytes(s)) for j, c, s in zip(ids, request["c-publics"], request["s-publics"])}
    floor = max(config.secagg_threshold_for(len(ids)), min_threshold)  # a neighbourhood under the floor: refused too
    if session.threshold < floor:
        raise ValueError(
            f"threshold {session.threshold} is below {floor} for a neighbourhood of {len(ids)} (the run's rule and "
            "this node's secagg-min-threshold): the server could collect both secrets of one client; refusing to share"
        )
    sealed = session.share(publics)
    _keep(session, state, str(request["round-id"]))
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


def unmask(msg: Message, state: RecordDict) -> dict:
    """Stage 4: for each neighbour, the share of its self-mask seed if it sent a masked input,
    of its mask key if not, never both. The session ends here."""
    request = _request(msg)
    session = _session(msg, state)
    kept = state[SESSION_STATE]
    if "sealed" not in kept:
        raise ValueError("this node sent no masked input in this round: nothing to unmask")
    sealed = {int(j): bytes(s) for j, s in zip(kept["sealed-ids"], kept["sealed"])}
    revealed = session.unmask(sealed, [int(j) for j in request["survivors"]])
    del state[SESSION_STATE]
    ids = sorted(revealed)
    return {SECAGG_RECORD: ConfigRecord({"ids": ids, "kinds": [revealed[j][0] for j in ids], "shares": [revealed[j][1] for j in ids]})}


def _advertise(msg: Message, context: Context, task) -> dict:
    """Stage 1, with how many examples the node trains on (the server sizes the weights by the largest)."""
    node = ConfigRecord({PARTITION_KEY: task.partition_id, NUM_EXAMPLES_KEY: len(task.split)})
    return {**advertise(msg, context.state), NODE_RECORD: node}


def _encode(msg: Message, context: Context, task, received, state: dict, num_examples: int) -> dict:
    return masked_update(msg, context.state, {k: v.numpy() for k, v in state.items()}, num_examples)


CLIENT = ClientHalf(encode=_encode, stages={
    ADVERTISE: _advertise,
    SHARE: lambda msg, context, task: share(msg, context.state, task.config, task.floors.secagg_min_threshold),
    UNMASK: lambda msg, context, task: unmask(msg, context.state),
})
