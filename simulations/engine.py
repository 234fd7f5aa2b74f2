"""The one place that calls Flower's in-process simulation runtime.

`flwr.simulation.run_simulation` is deprecated in Flower 1.41 but still the only way to run
a whole simulation inside one Python process (and so inside pytest). Keep every use of it
here: the next Flower release should be a one-file change.

Three changes to Flower's runtime live here too, each applied only around a simulation and
each for a measured cost (docs/scale.md): the engine's message dispatch scans its stored
messages once a poll instead of once per node; the partitions it gives its nodes are handed to
the ServerApp; and in a test session the Ray actors of one simulation serve the next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

from fedlearn.errors import ConfigError

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def quiet_flower(verbose: bool) -> None:
    """Keep Flower's per-round INFO logs out of the progress display unless asked for."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # Flower logs its own deprecation and configuration notices as warnings: they are
    # not the user's concern during `fedlearn simulate`, errors still show.
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="flwr")


def simulate(server_app, client_app, num_clients: int, *, num_cpus_per_client: float = 1.0,
             num_gpus_per_client: float = 0.0, ray_address: str = "", verbose: bool = False) -> None:
    """Run ``server_app`` against ``num_clients`` simulated ClientApps (Ray actors); each reserves
    ``num_gpus_per_client`` of a GPU (0.1: ten clients share one). With ``ray_address`` the actors
    run on that Ray cluster (as many as its nodes' CPUs and GPUs hold), else on a Ray runtime
    this process starts."""
    if num_gpus_per_client > 0 and not ray_address:
        import torch

        if not torch.cuda.is_available():  # Ray would wait forever for a GPU that is not there
            raise ConfigError([f"client-resources-num-gpus={num_gpus_per_client} but no CUDA GPU is visible here: "
                               "set it to 0 to simulate on CPU"])
    quiet_flower(verbose)
    from flwr.simulation import run_simulation

    backend_config = {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client},
        "init_args": {
            "include_dashboard": False,
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
            "configure_logging": True,
            **({"address": ray_address} if ray_address else {}),
        },
    }
    with _published_partitions(), _one_pass_dispatch():
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config=backend_config,
            verbose_logging=False,
        )
    if not verbose:  # run_simulation resets the flwr logger; keep it quiet for the next run
        logging.getLogger("flwr").setLevel(logging.ERROR)


def _undelivered_once_per_node(state, nodes: dict[int, int]) -> list:
    """What Flower's ``add_messages_to_queue`` collects in one poll, in one pass.

    Flower 1.41 asks its in-memory LinkState for each registered node in turn, and each ask
    scans every stored message: nodes x messages checks ten times a second (100 clients a round
    of 10,000: 3.7 s rounds, 1.2 s without; of 100,000: 21.8 s in Flower's own simulation, 1.9 s
    here, docs/scale.md). One pass over the
    stored messages yields the same ones: the first undelivered message of each node, marked
    delivered as ``get_message_ins`` marks them."""
    from flwr.supercore.date import now

    found: dict[int, object] = {}
    with state.lock:
        for msg_id in list(state.message_ins_store):
            state._check_stored_messages({msg_id})  # drops expired messages, as get_message_ins does
            message = state.message_ins_store.get(msg_id)
            if message is None or message.metadata.delivered_at != "":
                continue
            node = message.metadata.dst_node_id
            if node in nodes and node not in found:
                found[node] = message
    delivered_at = now().isoformat()
    for message in found.values():
        message.metadata.delivered_at = delivered_at
    return list(found.values())


@contextlib.contextmanager
def _one_pass_dispatch() -> Iterator[None]:
    """Replace the per-node polling loop of Flower's simulation engine by one pass a poll
    (_undelivered_once_per_node), for its in-memory LinkState; any other state keeps Flower's."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    own = vce_api.add_messages_to_queue

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        if not isinstance(state, InMemoryLinkState):
            return own(state, queue, nodes_mapping, f_stop)
        while not f_stop.is_set():
            for message in _undelivered_once_per_node(state, nodes_mapping):
                queue.put(message)
            f_stop.wait(0.1)

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = own


@contextlib.contextmanager
def _published_partitions() -> Iterator[None]:
    """Hand the ServerApp the partition the runtime gives each node as it registers them
    (server.grid.RUNTIME_PARTITIONS), so it need not ask every node before sampling some."""
    from flwr.server.superlink.fleet.vce import vce_api

    from server.grid import RUNTIME_PARTITIONS

    own = vce_api._register_nodes

    def register_and_publish(num_nodes, state_factory):
        mapping = own(num_nodes, state_factory)
        RUNTIME_PARTITIONS.update(mapping)
        return mapping

    RUNTIME_PARTITIONS.clear()
    vce_api._register_nodes = register_and_publish
    try:
        yield
    finally:
        vce_api._register_nodes = own
        RUNTIME_PARTITIONS.clear()


@contextlib.contextmanager
def shared_runtime() -> Iterator[None]:
    """Inside, simulations one after another in this process share one Ray runtime and its
    ClientApp actors.

    Flower starts Ray for each simulation and shuts it down at the end, about 7 s a run on
    2 cores, and each run starts new actors, which import torch again. A process that runs many
    (the test session) starts them once: the first run starts Ray as usual, later runs find it
    started (Flower's backend then skips `ray.init`) and take over the previous run's actors
    when all of them are idle and reserve the same resources (otherwise they are ended and new
    ones started); Ray stops when the context exits. Not for `fedlearn simulate`, whose first
    round is measured with its start-up included."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    idle: list = []  # the last run's actor pool, when every actor of it came back

    def keep_actors(backend: RayBackend) -> None:
        pool = backend.pool
        if pool is not None and len(pool.pool) == pool.num_actors and not pool._future_to_actor:
            idle[:] = [pool]
        elif pool is not None:
            pool.terminate_all_actors()

    def reuse_actors(backend: RayBackend, app_fn) -> None:
        pool = idle.pop() if idle else None
        if pool is not None and pool.client_resources == backend.client_resources:
            backend.pool, backend.app_fn = pool, app_fn
            return
        if pool is not None:
            pool.terminate_all_actors()
        own_build(backend, app_fn)

    own_terminate, own_build = RayBackend.terminate, RayBackend.build
    RayBackend.terminate, RayBackend.build = keep_actors, reuse_actors
    try:
        yield
    finally:
        RayBackend.terminate, RayBackend.build = own_terminate, own_build
        import ray

        ray.shutdown()
