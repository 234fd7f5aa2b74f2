"""Running a real Flower simulation from a test: the server's summary, and optionally every reply
it received, serialized as it travelled."""

from __future__ import annotations

from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import ServerApp

from clients.app import app as client_app
from fedlearn.config import RunConfig
from server.app import run_federation
from server.grid import GridWrapper
from simulations import engine


class RecordingGrid(GridWrapper):
    """Keeps the serialized payload of every reply the server receives."""

    def __init__(self, grid):
        super().__init__(grid)
        self.replies: list[tuple[str, bytes]] = []
        self.received = []  # the reply Messages themselves

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if not r.has_error():
                self.received.append(r)
                self.replies.append((r.metadata.message_type, recorddict_to_proto(r.content).SerializeToString()))
        return replies


def run(config: RunConfig, record: bool = False):
    summary, recorders = {}, []

    app = ServerApp()

    @app.main()
    def main(grid, context):
        recorder = RecordingGrid(grid) if record else grid
        recorders.append(recorder)
        summary.update(run_federation(recorder, config, on_round=lambda r: None))

    engine.simulate(app, client_app, config.num_clients, num_cpus_per_client=config.client_resources_num_cpus,
                    num_gpus_per_client=config.client_resources_num_gpus)
    assert summary, "the simulation ended without a result"
    return summary, (recorders[0] if record else None)
