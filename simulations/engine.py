"""The one place that calls Flower's in-process simulation runtime.

`flwr.simulation.run_simulation` is deprecated in Flower 1.41 but still the only way to run
a whole simulation inside one Python process (and so inside pytest). Keep every use of it
here: the next Flower release should be a one-file change.
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
             num_gpus_per_client: float = 0.0, verbose: bool = False) -> None:
    """Run ``server_app`` against ``num_clients`` simulated ClientApps (Ray actors); each reserves
    ``num_gpus_per_client`` of a GPU (0.1: ten clients share one)."""
    if num_gpus_per_client > 0:
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
        },
    }
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config=backend_config,
        verbose_logging=False,
    )
    if not verbose:  # run_simulation resets the flwr logger; keep it quiet for the next run
        logging.getLogger("flwr").setLevel(logging.ERROR)


@contextlib.contextmanager
def shared_runtime() -> Iterator[None]:
    """Inside, simulations one after another in this process share one Ray runtime.

    Flower starts Ray for each simulation and shuts it down at the end, about 7 s a run on
    2 cores. A process that runs many (the test session) starts it once: the first run starts
    it as usual, later runs find it started (Flower's backend then skips `ray.init`), each run
    still ends its own ClientApp actors, and Ray stops when the context exits. Not for
    `fedlearn simulate`, whose first round is measured with its start-up included."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    def end_actors_only(backend: RayBackend) -> None:
        if backend.pool:
            backend.pool.terminate_all_actors()

    own_terminate = RayBackend.terminate
    RayBackend.terminate = end_actors_only
    try:
        yield
    finally:
        RayBackend.terminate = own_terminate
        import ray

        ray.shutdown()
