"""Issue 22: any training reply, from any node, enrolled or not, ends as an accepted update or an
audited rejection, never as an exception that stops the run. Hypothesis builds replies with
arbitrary record contents (wrong types anywhere, NaN and infinite counts, malformed partition
ids, arrays whose bytes, dtype and shape disagree, records missing or added) and feeds them
through the server's reply handling, access control then the privacy mode's own check, for
every privacy mode. ``FEDLEARN_REPLY_EXAMPLES`` sets the number of cases per mode.

Failed before: a `clipped` of inf under secagg and he-threshold raised OverflowError, an array
with empty bytes under he raised EOFError, and a NaN example count or partition id raised
ValueError in access control; each stopped the run."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from clients.app import signed
from fedlearn import strategies as flower_strategies
from fedlearn.audit import read
from fedlearn.config import RunConfig
from fedlearn.messages import HE_RECORD, NODE_RECORD, NUM_EXAMPLES_KEY, PARTITION_KEY, SECAGG_RECORD
from fedlearn.threshold import RECORD as THRESHOLD_RECORD
from server.access import AccessGrid
from server.app import global_model
from tests.helpers import access_setup as setup  # noqa: F401  (fixture)
from tests.helpers import message

CASES = int(os.environ.get("FEDLEARN_REPLY_EXAMPLES", "100"))
CAP = 50  # the round's weight cap

scalars = st.one_of(
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -1, 0, 2**63 - 1]),
    st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(allow_nan=True, allow_infinity=True),  # what Flower carries
    st.text(max_size=8), st.binary(max_size=8), st.booleans(),
)
values = st.one_of(scalars, st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=4),
                   st.lists(st.floats(allow_nan=True), max_size=4), st.lists(st.binary(max_size=40), max_size=3))
metric_values = st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True),
                          st.lists(st.floats(allow_nan=True), max_size=3))
dtypes = st.sampled_from(["<f4", ">f4", "<f8", "<u2", ">u2", "<i8", "|u1", "|b1", "<c8", "O", "garbage"])


@st.composite
def arrays(draw, names):
    """An ArrayRecord whose arrays may claim any dtype and shape over any bytes."""
    record = {}
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        shape = tuple(draw(st.lists(st.integers(min_value=0, max_value=12), max_size=3)))
        record[name] = Array(dtype=draw(dtypes), shape=shape, stype="numpy.ndarray", data=draw(st.binary(max_size=300)))
    return ArrayRecord(record)


def flower_record(kind, mapping):
    """``kind(mapping)``, or None where Flower itself refuses the values (an empty list, a mixed
    one): no node could send such a record."""
    try:
        return kind(mapping)
    except (TypeError, ValueError):
        return None


def config_record(draw, keys):
    chosen = draw(st.lists(st.sampled_from(keys), max_size=len(keys), unique=True))
    record = flower_record(ConfigRecord, {k: draw(values) for k in chosen})
    assume(record is not None)
    return record


@st.composite
def edits(draw, mode_record, mode_keys, array_names):
    """What a broken or malicious node changes in an otherwise well-formed reply: records
    replaced by arbitrary ones, or dropped."""
    changes = {}
    for name in draw(st.lists(st.sampled_from(["arrays", "metrics", NODE_RECORD, mode_record, "extra"]), max_size=3, unique=True)):
        kind = draw(st.sampled_from(["drop", "edit", "edit", "config", "metrics", "arrays"]))
        if kind == "drop":
            changes[name] = None
        elif kind == "edit":  # some fields of the record as sent set to anything
            chosen = draw(st.lists(st.sampled_from([*mode_keys, PARTITION_KEY, NUM_EXAMPLES_KEY]), min_size=1, max_size=3, unique=True))
            changes[name] = {k: draw(values) for k in chosen}
        elif kind == "config":
            changes[name] = config_record(draw, [*mode_keys, PARTITION_KEY, NUM_EXAMPLES_KEY, "x"])
        elif kind == "metrics":
            chosen = draw(st.lists(st.sampled_from([NUM_EXAMPLES_KEY, "loss", "y"]), max_size=3, unique=True))
            changes[name] = flower_record(MetricRecord, {k: draw(metric_values) for k in chosen})
            assume(changes[name] is not None)
        else:
            changes[name] = draw(arrays(array_names))
    return changes


def _template(config):
    return {k: v.detach().numpy() for k, v in global_model(config).state_dict().items()}


def _plain(config, tmp):
    return None, lambda template: {"arrays": ArrayRecord({k: Array(v) for k, v in template.items()})}


def _secagg(config, tmp):
    from fedlearn.secagg import MASKED_ARRAY, RoundPlan
    from server.secagg import SecAggStrategy

    template = _template(config)
    strategy = SecAggStrategy(flower_strategies.build(config), config, template)
    strategy.plan = RoundPlan("round", 2, 2, 16, 12, 4, strategy.codec.length, CAP, tuple([0] * len(template)))
    return strategy, lambda template: {
        "arrays": ArrayRecord({MASKED_ARRAY: Array(np.zeros(strategy.codec.length, np.uint16))}),
        SECAGG_RECORD: ConfigRecord({"weight": 7 / CAP, "clipped": 0}),
    }


def _he(config, tmp):
    from crypto.he import generate_pair
    from server import he

    _, public = generate_pair(tmp, "bfv", 4)
    config = config.replace(privacy="he", he_public=str(public))
    strategy = he.HEStrategy(flower_strategies.build(config), config, _template(config))
    strategy.plan = he.RoundPlan(max_terms=4, weight_cap=CAP)
    return strategy, lambda template: {
        "arrays": ArrayRecord({"ct-00000": Array(np.frombuffer(b"\x01" * 64, np.uint8))}),
        HE_RECORD: ConfigRecord({"weight": 7 / CAP, "clipped": 0, "range-exp": [0] * len(template)}),
    }


def _threshold(config, tmp):
    from crypto import threshold
    from fedlearn.threshold import Committee, RoundPlan
    from server.threshold import ThresholdStrategy
    from tests.helpers import needs_openfhe

    needs_openfhe()

    strategy = ThresholdStrategy(flower_strategies.build(config), config, _template(config))
    strategy.committee = Committee("ceremony", threshold.new_context(), b"", (1, 2, 3), (0, 1, 2), 2, (b"", b"", b""))
    strategy.plan = RoundPlan(12, 4, CAP, tuple([0] * len(strategy.codec.template)))
    return strategy, lambda template: {
        "arrays": ArrayRecord({"ct-00000": Array(np.frombuffer(b"\x01" * 64, np.uint8))}),
        THRESHOLD_RECORD: ConfigRecord({"weight": 7 / CAP, "clipped": 0}),
    }


MODES = {  # privacy mode -> (its reply record, that record's keys, array names, set-up)
    "plain": ("plain", [], ["weight", "bias"], _plain),
    "secagg": (SECAGG_RECORD, ["weight", "clipped"], ["masked", "weight"], _secagg),
    "he": (HE_RECORD, ["weight", "clipped", "range-exp"], ["ct-00000", "ct-00001"], _he),
    "he-threshold": (THRESHOLD_RECORD, ["weight", "clipped"], ["ct-00000", "ct-00001"], _threshold),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_no_reply_content_escapes_as_an_exception(tmp_path, setup, run_identity, mode):
    mode_record, mode_keys, array_names, set_up = MODES[mode]
    config = RunConfig.from_flat({"num-clients": 4, "model": "logreg", "privacy": "plain" if mode == "plain" else mode})
    strategy, valid = set_up(config, tmp_path)
    template = _template(config)
    keys, policy, audit = setup
    check = strategy.check_reply if strategy is not None else None
    outcomes = {"accepted": 0, "rejected": 0}

    infinite = float("inf")

    @settings(max_examples=CASES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(changes=edits(mode_record, mode_keys, array_names), signer=st.sampled_from(["good", "good", "unknown", None]),
           count=st.one_of(st.just(7), metric_values), partition=st.one_of(st.just(0), values))
    @example(changes={mode_record: {k: infinite for k in mode_keys}}, signer="good", count=7, partition=0)
    @example(changes={mode_record: {k: [1, 2] for k in mode_keys}}, signer="good", count=7, partition=0)
    @example(changes={}, signer="good", count=infinite, partition=infinite)
    @example(changes={}, signer="good", count=float("nan"), partition="zero")
    def one_reply(changes, signer, count, partition):
        grid = AccessGrid(None, policy, audit, "run-A", model=ArrayRecord({k: Array(v) for k, v in template.items()}),
                          check_update=check)
        request = message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in template.items()}),
                                      "config": ConfigRecord({"server-round": 2})}), src=1, dst=101, message_type=MessageType.TRAIN)
        grid._grid = Answering(lambda msg: built_reply(msg, valid(template), changes, keys.get(signer), count, partition))
        (reply,) = grid.send_and_receive([request])  # must not raise, whatever the reply holds
        last = read(audit.path)[-1]
        assert last["event"] in ("update_accepted", "update_rejected") and last["data"]["node_id"] == 101
        if reply.has_error():
            assert reply.error.reason.startswith("update rejected by access control: ")
            assert last["event"] == "update_rejected"
            outcomes["rejected"] += 1
        else:
            assert last["event"] == "update_accepted"
            outcomes["accepted"] += 1

    one_reply()
    print(f"{mode}: {sum(outcomes.values())} replies, {outcomes['accepted']} accepted, {outcomes['rejected']} rejected")
    assert outcomes["rejected"] > 0 and sum(outcomes.values()) >= min(CASES, 20)


class Answering:
    def __init__(self, answer):
        self.answer = answer

    def send_and_receive(self, messages, *, timeout=None):
        return [self.answer(m) for m in messages]


def built_reply(msg, records, changes, key, count, partition) -> Message:
    """A reply: the well-formed ``records`` with ``changes``, a count and a partition id, signed
    by ``key`` (None: unsigned)."""
    metrics, node = flower_record(MetricRecord, {NUM_EXAMPLES_KEY: count}), flower_record(ConfigRecord, {PARTITION_KEY: partition})
    assume(metrics is not None and node is not None)
    content = RecordDict({**records, "metrics": metrics, NODE_RECORD: node})
    for name, record in changes.items():
        if isinstance(record, dict):  # edit the record as sent, keeping its type
            sent = content.get(name, ConfigRecord())
            record = flower_record(type(sent), {**dict(sent), **record}) if not isinstance(sent, ArrayRecord) else None
            assume(record is not None)
        if name in content:
            del content[name]
        if record is not None:
            content[name] = record
    if key is not None:
        content = signed(msg, content, key)
    return Message(content, reply_to=msg)
