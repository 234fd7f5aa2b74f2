import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from server.metering import payload_bytes


def test_payload_bytes_track_array_size():
    small = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(10, dtype=np.float32))})})
    large = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(10_000, dtype=np.float32))})})
    assert 40 < payload_bytes(small) < 400
    assert 40_000 <= payload_bytes(large) < 41_000
    with_config = RecordDict({"arrays": large["arrays"], "config": ConfigRecord({"lr": 0.1})})
    assert payload_bytes(with_config) > payload_bytes(large)
