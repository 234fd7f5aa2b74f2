"""fedlearn.checkpoint and server.resume: what a checkpoint holds comes back exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM

from fedlearn.checkpoint import FILE, Checkpoint, CheckpointError
from server.resume import ResumedStrategy, restore_strategy_state, strategy_state


def test_a_checkpoint_round_trips_model_state_and_random_generator(tmp_path):
    sampling = random.Random(3)
    model = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float64)}
    saved = Checkpoint(round=4, model=model, strategy={"m_t/w": np.ones(2)}, layout={"m_t": {"kind": "dict", "keys": ["w"]}},
                       config_digest="abc", audit_seq=17, audit_head="f" * 64, python_random=sampling.getstate())
    saved.save(tmp_path)
    expected = [sampling.random() for _ in range(3)]
    loaded = Checkpoint.load(tmp_path)
    assert (loaded.round, loaded.config_digest, loaded.audit_seq, loaded.audit_head) == (4, "abc", 17, "f" * 64)
    for name, array in model.items():
        np.testing.assert_array_equal(loaded.model[name], array)
        assert loaded.model[name].dtype == array.dtype
    np.testing.assert_array_equal(loaded.strategy["m_t/w"], np.ones(2))
    resumed = random.Random(0)
    loaded.restore_random(resumed)
    assert [resumed.random() for _ in range(3)] == expected


def test_a_missing_or_damaged_checkpoint_gets_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        Checkpoint.load(tmp_path)
    (tmp_path / FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="is damaged"):
        Checkpoint.load(tmp_path)


def _arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((2, 2), value, np.float32))})


@pytest.mark.parametrize("strategy_class", [FedAvgM, FedAdam])
def test_strategy_state_is_restored_into_a_fresh_strategy(strategy_class):
    original = strategy_class()
    original.current_arrays = _arrays(1.0) if strategy_class is FedAvgM else {"w": np.full((2, 2), 1.0)}
    if strategy_class is FedAvgM:
        original.momentum_vector = [np.full((2, 2), 0.5)]
    else:
        original.m_t, original.v_t = {"w": np.full((2, 2), 0.1)}, {"w": np.full((2, 2), 0.01)}
    arrays, layout = strategy_state(original)
    fresh = strategy_class()
    restore_strategy_state(fresh, arrays, layout)
    for attribute in layout:
        before, after = getattr(original, attribute), getattr(fresh, attribute)
        assert type(before) is type(after)
        if isinstance(before, ArrayRecord):
            before, after = before.to_numpy_ndarrays(), after.to_numpy_ndarrays()
        pairs = zip(before, after) if isinstance(before, list) else ((before[k], after[k]) for k in before)
        for a, b in pairs:
            np.testing.assert_array_equal(a, b)


def test_a_resumed_strategy_shifts_every_round_it_forwards():
    seen = []

    class Recorder(FedAvgM):
        def configure_train(self, server_round, arrays, config, grid):
            seen.append(("train", server_round))
            return []

        def aggregate_train(self, server_round, replies):
            seen.append(("aggregate", server_round))
            return None, None

    ResumedStrategy(Recorder(), offset=3).configure_train(1, _arrays(0.0), ConfigRecord(), None)
    ResumedStrategy(Recorder(), offset=3).aggregate_train(2, [])
    assert seen == [("train", 4), ("aggregate", 5)]
