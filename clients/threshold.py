"""A node's side of privacy=he-threshold (see fedlearn.threshold): a key holder's answers to the
ceremony and decryption stages, and every trainer's encrypted update. Each function returns the
records of its reply. A key holder's secrets stay in its node's private state (``context.state``)
for the run; nothing secret leaves the node except Shamir shares sealed for one other member
each and, when the server asks for a member that did not answer, its Shamir shares of that
member's sealing key (at most committee - quorum members a run)."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.privacy import ClientHalf
from crypto import threshold
from crypto.threshold import CommitteeMember
from fedlearn import he
from fedlearn.encoding import FixedPointCodec
from fedlearn.threshold import DECRYPT, HOLD, JOIN, KEYGEN, MEMBER_STATE, RECORD, REVEAL, RoundPlan


def _request(msg: Message) -> ConfigRecord:
    if RECORD not in msg.content:
        raise ValueError(f"a he-threshold request without its {RECORD} record")
    return msg.content[RECORD]


def _member(msg: Message, state: RecordDict) -> CommitteeMember:
    ceremony = str(_request(msg)["ceremony"])
    if MEMBER_STATE not in state or state[MEMBER_STATE].get("ceremony") != ceremony:
        raise ValueError(f"this node took no part in key ceremony {ceremony} (it did not join it, or restarted since)")
    return CommitteeMember.from_state(state[MEMBER_STATE])


def _keep(member: CommitteeMember, state: RecordDict) -> None:
    state[MEMBER_STATE] = ConfigRecord(member.to_state())


def join(msg: Message, state: RecordDict) -> dict:
    """Ceremony stage 1: a fresh agreement key, to receive Shamir shares sealed for this node."""
    member = CommitteeMember.join(str(_request(msg)["ceremony"]))
    _keep(member, state)
    return {RECORD: ConfigRecord({"agreement-key": member.public_agreement_key()})}


def keygen(msg: Message, state: RecordDict) -> dict:
    """Ceremony stage 2: this member's key share, its sealed backup and the sealed Shamir shares."""
    request, member = _request(msg), _member(msg, state)
    previous = bytes(request["previous-public"]) or None
    public, sealed, shares = member.make_key(bytes(request["context"]), int(request["member"]), int(request["quorum"]),
                                             previous, [bytes(k) for k in request["agreement-keys"]])
    _keep(member, state)
    return {RECORD: ConfigRecord({"public": public, "sealed-share": sealed, "shares": shares})}


def hold(msg: Message, state: RecordDict) -> dict:
    """Ceremony stage 3: open and keep the Shamir shares the other members sealed for this one."""
    request, member = _request(msg), _member(msg, state)
    sealed = dict(zip((int(m) for m in request["from"]), (bytes(s) for s in request["sealed"]), strict=True))
    member.hold(sealed, [bytes(k) for k in request["agreement-keys"]])
    _keep(member, state)
    return {RECORD: ConfigRecord({"held": len(sealed)})}


def decrypt(msg: Message, state: RecordDict) -> dict:
    """This member's partial decryption of the round's summed ciphertexts."""
    request, member = _request(msg), _member(msg, state)
    blobs = he.record_chunks(msg.content["arrays"])
    return {"arrays": he.encrypted_record(member.partial_decrypt(bytes(request["context"]), blobs))}


def reveal(msg: Message, state: RecordDict) -> dict:
    """This member's Shamir shares of the sealing keys of the members that did not answer."""
    member = _member(msg, state)
    revealed = member.reveal([int(m) for m in _request(msg)["missing"]])
    _keep(member, state)
    ids = sorted(revealed)
    return {RECORD: ConfigRecord({"ids": ids, "shares": [revealed[m] for m in ids]})}


def encrypted_update(msg: Message, local: dict[str, np.ndarray], num_examples: int) -> dict:
    """The trained model, weighted, fixed-point encoded and encrypted under the joint key."""
    request = _request(msg)
    plan = RoundPlan.from_record(request)
    if num_examples > plan.weight_cap:
        raise ValueError(f"this node trained on {num_examples} examples but told the server {plan.weight_cap} at most")
    weight = num_examples / plan.weight_cap
    encoded, clipped = FixedPointCodec(local).encode(local, weight, plan)
    blobs = threshold.encrypt(bytes(request["context"]), bytes(request["joint-public"]), encoded)
    return {"arrays": he.encrypted_record(blobs), RECORD: ConfigRecord({"weight": weight, "clipped": clipped})}


def _encode(msg: Message, context: Context, task, received, state: dict, num_examples: int) -> dict:
    return encrypted_update(msg, {k: v.numpy() for k, v in state.items()}, num_examples)


def _stage(answer):
    """A key holder's stage: its answer from the node's private state."""
    return lambda msg, context, task: answer(msg, context.state)


CLIENT = ClientHalf(encode=_encode, stages={
    JOIN: _stage(join), KEYGEN: _stage(keygen), HOLD: _stage(hold), DECRYPT: _stage(decrypt), REVEAL: _stage(reveal),
})
