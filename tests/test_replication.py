"""Paper replication as a (slow) regression test: McMahan et al. 2017, MNIST 2NN, IID."""

import pytest

from fedlearn.config import RunConfig
from simulations import simulate


@pytest.mark.slow
def test_mcmahan_2nn_reaches_97_percent_within_the_papers_rounds(tmp_path, mnist_data_dir):
    # Table 1 of the paper: 2NN, E=1, B=10, C=0.1, IID reaches 97% test accuracy in 87 rounds.
    config = RunConfig.from_flat(
        {
            "dataset": "mnist", "data-dir": str(mnist_data_dir), "model": "mnist-2nn", "partitioner": "iid",
            "num-clients": 100, "fraction-train": 0.1, "local-epochs": 1, "batch-size": 10,
            "optimizer": "sgd", "lr": 0.1, "num-rounds": 87, "target-accuracy": 0.97,
            "out-dir": str(tmp_path),
        }
    )
    summary = simulate.run(config)
    assert summary["stopped_at_target"] and summary["final_accuracy"] >= 0.97
    assert summary["rounds"] <= 87
