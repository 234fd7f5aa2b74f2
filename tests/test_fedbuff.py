"""FedBuff: the asynchronous loop (no server update waits for a straggler, staleness-discounted
weighted deltas), access control over push/pull, config errors, and real Flower rounds."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from clients.app import reply
from crypto import signing
from fedlearn import audit
from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError, RoundFailed
from fedlearn.fedbuff import FedBuff, staleness_weight
from server.access import AccessGrid
from tests.helpers import access_setup as setup  # noqa: F401  (fixture)
from tests.helpers import assert_log_verifies, run_simulation

FEDBUFF = {"strategy": "fedbuff", "privacy": "plain"}


def config(**overrides) -> RunConfig:
    return RunConfig.from_flat({**FEDBUFF, **overrides})


class AsyncGrid:
    """Nodes that answer pushed requests after a number of pulls (their speed), each adding its
    own delta to the model it was sent."""

    def __init__(self, delays: dict[int, int], deltas: dict[int, float], answer=None):
        self.delays, self.deltas, self.answer = delays, deltas, answer
        self.queue: list[list] = []  # [pulls left, request]
        self.pushed: list = []

    def get_node_ids(self):
        return list(self.delays)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.queue.append([self.delays[m.metadata.dst_node_id], m])
            self.pushed.append(m)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        ready = []
        for item in self.queue:
            item[0] -= 1
            if item[0] <= 0:
                ready.append(item)
        self.queue = [item for item in self.queue if item[0] > 0]
        return [self._reply(m) for _, m in ready if m.metadata.message_id in set(message_ids)]

    def _reply(self, request):
        node = request.metadata.dst_node_id
        if self.answer:
            return self.answer(request)
        arrays = {k: Array(v.numpy() + self.deltas[node]) for k, v in request.content["arrays"].items()}
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 10 * node, "loss": 1.0})})
        from flwr.app import Message

        return Message(content, reply_to=request)


def strategy(buffer_size: int, exponent: float = 0.5) -> FedBuff:
    return FedBuff(buffer_size, exponent, 1.0, fraction_train=1.0, fraction_evaluate=0.0,
                   min_train_nodes=1, min_available_nodes=1)


def test_staleness_discounts_old_updates():
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert staleness_weight(5, 0.0) == 1.0


def test_server_updates_do_not_wait_for_a_straggler(run_identity):
    """Nodes 1 and 2 answer at every pull, node 3 only after 50: three server updates of buffer 2
    happen from the fast nodes alone, each the weighted mean of their deltas; node 3 is still busy."""
    grid = AsyncGrid(delays={1: 1, 2: 1, 3: 50}, deltas={1: 1.0, 2: 4.0, 3: 100.0})
    fedbuff = strategy(buffer_size=2)
    start = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    seen = []
    result = fedbuff.start(grid, start, num_rounds=3, timeout=60, train_config=ConfigRecord({}),
                           evaluate_fn=lambda r, arrays: seen.append((r, arrays["w"].numpy().copy())))
    step = (10 * 1.0 + 20 * 4.0) / 30  # examples 10 and 20, both fresh (staleness 0)
    np.testing.assert_allclose(result.arrays["w"].numpy(), 3 * step, rtol=1e-6)
    assert [r for r, _ in seen] == [0, 1, 2, 3]
    assert fedbuff.staleness == {1: [0, 0], 2: [0, 0], 3: [0, 0]}
    rounds = [int(m.content["config"]["server-round"]) for m in grid.pushed]
    assert rounds.count(1) == 3 and sorted(set(rounds)) == [1, 2, 3]  # node 3 was sent model 0 only


def test_a_late_update_is_applied_with_its_staleness(run_identity):
    """Node 2 answers after two server updates made from node 1: its delta (from model 0) is
    two updates old, and it is applied as the change it made to the model it was sent."""
    grid = AsyncGrid(delays={1: 1, 2: 3}, deltas={1: 1.0, 2: 10.0})
    fedbuff = strategy(buffer_size=1)
    result = fedbuff.start(grid, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), num_rounds=3, timeout=60,
                           train_config=ConfigRecord({}))
    assert fedbuff.staleness == {1: [0], 2: [0], 3: [2]}
    np.testing.assert_allclose(result.arrays["w"].numpy(), 1.0 + 1.0 + 10.0)


def test_stale_deltas_weigh_less_in_a_server_update(run_identity):
    fedbuff = strategy(buffer_size=2, exponent=1.0)
    current = ArrayRecord({"w": Array(np.zeros(1, np.float32))})
    metrics = RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 0.0})})
    updates = [({"w": np.array([1.0])}, 10.0, 0, metrics), ({"w": np.array([10.0])}, 10.0, 1, metrics)]
    from flwr.serverapp.strategy.result import Result

    new = fedbuff._apply(current, updates, 1, Result())
    np.testing.assert_allclose(new["w"].numpy(), (10 * 1.0 + 5 * 10.0) / 15)  # weights 10 and 10 / (1 + 1)


def test_no_update_at_all_stops_the_run_with_a_reason(run_identity):
    from flwr.app import Error, Message

    grid = AsyncGrid(delays={1: 1}, deltas={1: 0.0}, answer=lambda m: Message(Error(code=1, reason="boom"), reply_to=m))
    with pytest.raises(RoundFailed, match="no client update for round-timeout"):
        strategy(1).start(grid, ArrayRecord({"w": Array(np.zeros(1, np.float32))}), num_rounds=2, timeout=0.3,
                          train_config=ConfigRecord({}))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"privacy": "secagg"}, "strategy=fedbuff cannot run with privacy=secagg"),
        ({"privacy": "he"}, "strategy=fedbuff cannot run with privacy=he"),
        ({"buffer-size": 11}, "buffer-size=11: must be between 1 and num-clients=10"),
        ({"dropout-rate": 0.2}, "dropout-rate injects dropouts into synchronous rounds"),
        ({"strategy": "fedavg", "buffer-size": 3}, "buffer-size=3 only applies to strategy=fedbuff"),
        ({"slow-fraction": 0.3}, "set both"),
        ({"slow-fraction": 1.5, "slow-seconds": 1.0}, r"slow-fraction=1.5: must be in \[0, 1\]"),
        ({"client-resources-num-cpus": 0}, "client-resources-num-cpus=0.0: must be > 0"),
    ],
)
def test_config_errors_name_the_problem(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as error:
        config(**overrides)
    assert str(error.value).count("strategy=fedbuff cannot run") <= 1  # one reason, not he's generic one too


def test_stragglers_are_a_seeded_choice_of_clients():
    cfg = config(**{"slow-fraction": 0.3, "slow-seconds": 1.0})
    slow = [p for p in range(10) if cfg.is_slow(p)]
    assert len(slow) == 3 and slow == [p for p in range(10) if cfg.is_slow(p)]
    assert config().buffer_count() == 5 and not any(config().is_slow(p) for p in range(10))


def test_access_control_checks_pushed_requests_replies(setup, run_identity):  # noqa: F811
    """Over push/pull each request gets its own challenge; signed replies pass, an unsigned one and
    a key answering for a second node are refused and audited; the log verifies."""
    keys, policy, log = setup
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})

    def signed_by(name):
        def answer(request):
            content = {"arrays": ArrayRecord({"w": Array(np.ones(2, np.float32))}), "metrics": MetricRecord({"num-examples": 5})}
            return reply(request, 0, keys[name], **content)
        return answer

    answers = {1: signed_by("good"), 2: lambda m: reply(m, 1, None, arrays=arrays, metrics=MetricRecord({"num-examples": 5})),
               3: signed_by("good")}
    inner = AsyncGrid(delays={1: 1, 2: 1, 3: 2}, deltas={}, answer=lambda m: answers[m.metadata.dst_node_id](m))
    grid = AccessGrid(inner, policy, log, "run-A", model=arrays)
    from flwr.app import Message

    requests = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=n,
                        message_type=MessageType.TRAIN) for n in (1, 2, 3)]
    ids = list(grid.push_messages(requests))
    assert len({str(m.content["auth"]["nonce"]) for m in requests}) == 3
    replies = list(grid.pull_messages(ids)) + list(grid.pull_messages(ids))
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert not by_node[1].has_error()
    assert "unsigned reply" in by_node[2].error.reason
    assert "already answers for node 1" in by_node[3].error.reason
    assert_log_verifies(setup)


def test_fedbuff_in_a_flower_simulation_with_a_straggler(tmp_path):
    """Real Flower simulation: 4 clients, one 3 s slower per update, buffer 2: the server updates
    come from the fast clients while the slow one trains, every update is signed and accepted, the
    audit log verifies and records each update's staleness."""
    cfg = config(**{
        "num-clients": 4, "num-rounds": 6, "buffer-size": 2, "slow-fraction": 0.25, "slow-seconds": 3.0,
        "client-resources-num-cpus": 0.5, "out-dir": str(tmp_path),
    })
    summary, _ = run_simulation(cfg)
    run_dir = tmp_path / summary["run_id"]
    records = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["event"] == "update_rejected"]
    ends = [r["data"] for r in records if r["event"] == "round_end"]
    assert len(ends) == 6 and all(len(e["staleness"]) == 2 for e in ends)
    slow = next(p for p in range(4) if cfg.is_slow(p))
    accepted = [r["data"].get("partition") for r in records if r["event"] == "update_accepted"]
    assert accepted.count(slow) < accepted.count((slow + 1) % 4)  # the straggler contributes less often
    verdict = audit.verify(run_dir / "audit.jsonl", signing.load_public(run_dir / "audit.pub"))
    assert verdict.ok, verdict.summary()
    assert summary["final_accuracy"] > 0.7


def test_several_server_updates_from_one_pull(run_identity):
    """Replies that arrive together fill the buffer several times over: each fill is a server
    update of its own, evaluated in turn."""
    grid = AsyncGrid(delays={1: 1, 2: 1, 3: 1, 4: 1}, deltas={1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})
    seen = []
    strategy(buffer_size=1).start(grid, ArrayRecord({"w": Array(np.zeros(1, np.float32))}), num_rounds=4, timeout=60,
                                  train_config=ConfigRecord({}), evaluate_fn=lambda r, a: seen.append(r))
    assert seen == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_server_updates_without_new_replies_in_a_flower_simulation(tmp_path):
    """Buffer 1 and clients that answer together: some server updates come only from updates
    pulled earlier, and the run goes on (it once stopped there as if no client had answered)."""
    cfg = config(**{"num-clients": 3, "num-rounds": 8, "buffer-size": 1, "client-resources-num-cpus": 0.5,
                    "out-dir": str(tmp_path)})
    summary, _ = run_simulation(cfg)
    metrics = json.loads((tmp_path / summary["run_id"] / "metrics.json").read_text())
    assert [m["round"] for m in metrics] == list(range(9))
