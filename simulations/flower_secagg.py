"""Flower's own SecAgg+ (legacy ``SecAggPlusWorkflow`` + ``secaggplus_mod``) running a fedlearn
job, as the baseline the secagg benchmark measures against side by side.

Only the benchmark uses it: it is Flower's workflow with Flower's defaults (32-bit masks,
weights clipped to +-8, legacy strategy API), driving fedlearn's model, data and training
loop, so that the only difference from our arms is the aggregation protocol.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from fedlearn import data, models
from fedlearn.config import RunConfig
from fedlearn.training import client_seed, evaluate, select_device, train
from server.grid import MeteredGrid


def _weights(model: torch.nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def _load(model: torch.nn.Module, weights: list[np.ndarray]) -> None:
    keys = list(model.state_dict())
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(w)) for k, w in zip(keys, weights)})


class _Client(NumPyClient):
    def __init__(self, config: RunConfig, partition_id: int):
        self.config, self.partition_id = config, partition_id
        self.split = data.client_split(config, partition_id, config.num_clients)

    def fit(self, parameters, fit_config):
        model = models.for_run(self.config, seeded=False)
        _load(model, parameters)
        server_round = int(fit_config["server-round"])
        result = train(model, self.split, self.config, server_round, seed=client_seed(self.config.seed, server_round, self.partition_id))
        return _weights(model), result.num_examples, {"loss": result.loss}


def apps(config: RunConfig, secure: bool = True) -> tuple[ServerApp, ClientApp, dict]:
    """A legacy ServerApp/ClientApp pair for ``config`` (with SecAgg+ when ``secure``) and the
    dict it fills: per-round seconds, upload bytes and accuracies."""
    timings: dict = {"rounds": [], "bytes_up": [], "accuracy": []}
    model = models.for_run(config)
    test = data.loaded(config).test
    device = select_device(config.device)
    state = {"clock": None, "grid": None}

    def evaluate_fn(server_round, parameters, _config):
        _load(model, parameters)
        loss, accuracy = evaluate(model, test, device)
        now = time.perf_counter()
        if server_round > 0:
            timings["rounds"].append(now - state["clock"])
            timings["bytes_up"].append(state["grid"].take_traffic().bytes_up)
            timings["accuracy"].append(accuracy)
        else:
            state["grid"].take_traffic()
        state["clock"] = now
        return loss, {"accuracy": accuracy}

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context: Context) -> None:
        n = config.num_clients
        strategy = FedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
            initial_parameters=ndarrays_to_parameters(_weights(model)), evaluate_fn=evaluate_fn,
            on_fit_config_fn=lambda r: {"server-round": r},
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=config.num_rounds), strategy=strategy)
        fit = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5) if secure else None
        workflow = DefaultWorkflow(fit_workflow=fit) if fit else DefaultWorkflow()
        state["grid"] = MeteredGrid(grid)
        workflow(state["grid"], legacy)

    def client_fn(context: Context):
        return _Client(config, int(context.node_config["partition-id"])).to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])
    return server_app, client_app, timings
