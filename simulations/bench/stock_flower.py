"""The reference for the scale benchmark: the same FedAvg job in Flower's own simulation, with
none of fedlearn around it (no access control, audit, privacy mode or engine changes).

Flower's ServerApp with its FedAvg strategy, a ClientApp that trains on the same per-user data
(fedlearn.data.synthetic_user) with the same local training (fedlearn.training.train) and the
same Ray settings as `fedlearn simulate`. Run it as a process of its own, so that no patch of
simulations.engine is loaded:

    python -m simulations.bench.stock_flower --clients 100000 --sampled 100 --rounds 5

It prints one JSON line: the seconds of each round (between Flower's calls of evaluate_fn,
which comes after each round's aggregation) and the final accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import time


def _config(clients: int, sampled: int, rounds: int):
    from fedlearn.config import RunConfig

    return RunConfig.from_flat({"dataset": "synthetic-users", "model": "logreg", "num-clients": clients,
                                "fraction-train": sampled / clients, "num-rounds": rounds, "privacy": "plain"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench.stock_flower", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--sampled", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedlearn import data, models
    from fedlearn.training import client_seed, evaluate, train

    config = _config(args.clients, args.sampled, args.rounds)
    client_app = ClientApp()

    @client_app.train()
    def local_training(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        model = models.for_run(config, seeded=False)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        split = data.client_split(config, partition, config.num_clients)
        server_round = int(msg.content["config"]["server-round"])
        result = train(model, split, config, server_round, seed=client_seed(config.seed, server_round, partition))
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": result.num_examples})})
        return Message(content=content, reply_to=msg)

    ticks: list[float] = []
    accuracy: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def serve(grid: Grid, context: Context) -> None:
        model = models.for_run(config)
        test = data.test_split(config)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            accuracy.append(evaluate(model, test, torch.device("cpu"))[1])
            ticks.append(time.perf_counter())
            return MetricRecord({"accuracy": accuracy[-1]})

        strategy = FedAvg(fraction_train=config.fraction_train, fraction_evaluate=0.0,
                          min_available_nodes=config.min_available_clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=config.num_rounds,
                       evaluate_fn=evaluate_fn)

    logging.getLogger("flwr").setLevel(logging.ERROR)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0},
                                   "init_args": {"include_dashboard": False, "logging_level": logging.ERROR,
                                                 "log_to_driver": False}},
                   verbose_logging=False)
    rounds = [round(b - a, 3) for a, b in zip(ticks, ticks[1:])]
    print(json.dumps({"round_seconds": rounds, "final_accuracy": accuracy[-1] if accuracy else None}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
