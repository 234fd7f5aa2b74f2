"""IFCA, the Iterative Federated Clustering Algorithm (Ghosh et al. 2020), on Flower's FedAvg.

The server keeps k cluster models. Each round every sampled client receives all k, picks the
one with the lowest loss on its own training data, trains only that one and says which it
trained; the server averages each cluster's updates apart. Clients whose data come from the
same distribution end up on the same model, without anyone telling the server who they are.

All k models travel as one ArrayRecord (fedlearn.packing: ``cluster-<j>/<name>``), so Flower's
round loop, checkpoints and the audit digests handle them like one model. A client's update is
one model under its plain names (what access control checks), plus the ``ifca`` record that
names the cluster.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from logging import WARNING

from fedlearn import models, packing
from fedlearn.data import Split
from fedlearn.families import ClientRound, LocalUpdate
from fedlearn.fedavg import FedAvgFamily, UpdateCheck, detached, tensors
from fedlearn.messages import NODE_RECORD, PARTITION_KEY
from fedlearn.training import evaluate, select_device
from fedlearn.updates import check_plain_update

IFCA_RECORD = "ifca"
CLUSTER_KEY = "cluster"


def cluster_name(cluster: int) -> str:
    return f"cluster-{cluster}"


def pack(states: list[dict]) -> ArrayRecord:
    """k models (numpy or torch state dicts) as one ArrayRecord."""
    return packing.pack({cluster_name(j): state for j, state in enumerate(states)})


def unpack(record: ArrayRecord, clusters: int) -> list[dict[str, np.ndarray]]:
    """The k models of ``record`` as numpy state dicts under their plain names."""
    names = [cluster_name(j) for j in range(clusters)]
    states = packing.unpack(record, names)
    return [states[name] for name in names]


def initial_arrays(config) -> ArrayRecord:
    """k models from k seeds: clusters must start apart, or every client picks the same one."""
    return pack([models.for_run(config, seed=config.seed + j).state_dict() for j in range(config.cluster_count())])


def load_cluster_models(record, config) -> list[torch.nn.Module]:
    """The k cluster models of ``record`` (an ArrayRecord, or packed numpy arrays)."""
    modules = []
    for state in unpack(record, config.cluster_count()):
        module = models.for_run(config, seeded=False)
        module.load_state_dict(tensors(state))
        modules.append(module)
    return modules


def choose_cluster(modules: list[torch.nn.Module], split: Split, device: torch.device) -> tuple[int, list[float]]:
    """The cluster whose model has the lowest loss on ``split`` (IFCA's cluster estimate)."""
    losses = [evaluate(module, split, device)[0] for module in modules]
    return int(np.argmin(losses)), losses


def cluster_record(cluster: int, losses: list[float]) -> ConfigRecord:
    return ConfigRecord({CLUSTER_KEY: cluster, "losses": [float(v) for v in losses]})


def cluster_of(content: RecordDict, clusters: int) -> int:
    """The cluster a training reply trained; ValueError when the reply does not say a valid one."""
    if IFCA_RECORD not in content or CLUSTER_KEY not in content[IFCA_RECORD]:
        raise ValueError("an ifca update must say which cluster it trained (the 'ifca' record)")
    cluster = content[IFCA_RECORD][CLUSTER_KEY]
    if isinstance(cluster, bool) or not isinstance(cluster, int) or not 0 <= cluster < clusters:
        raise ValueError(f"cluster {cluster!r} is not one of the run's clusters 0..{clusters - 1}")
    return cluster


class IFCA(FedAvg):
    """FedAvg's sampling and weighting, one average per cluster. ``membership[round]`` maps each
    client's partition id to the cluster it trained that round."""

    def __init__(self, clusters: int, **kwargs):
        super().__init__(**kwargs)
        self.clusters = clusters
        self.membership: dict[int, dict[int, int]] = {}
        self.reseeded: dict[int, dict[int, int]] = {}  # round -> {cluster: partition whose model restarted it}
        self._current: ArrayRecord | None = None

    def summary(self) -> None:
        super().summary()
        log(20, "\t└──> IFCA: %d cluster models", self.clusters)

    def check_reply(self, content: RecordDict) -> None:
        """Access control calls this on every training reply, besides the arrays check."""
        cluster_of(content, self.clusters)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._current = arrays  # clusters no client picks this round keep their model
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self._current is None:
            return None, None
        groups: dict[int, list[RecordDict]] = {}
        members: dict[int, int] = {}
        fits: list[tuple[float, int, RecordDict]] = []  # (loss on its own cluster, cluster, reply)
        for reply in valid:
            try:
                cluster = cluster_of(reply.content, self.clusters)
            except ValueError as exc:  # access control refuses these first; never let one sink a round
                log(WARNING, "ifca: ignored a reply from node %d: %s", reply.metadata.src_node_id, exc)
                continue
            groups.setdefault(cluster, []).append(reply.content)
            if NODE_RECORD in reply.content:
                members[int(reply.content[NODE_RECORD][PARTITION_KEY])] = cluster
            losses = reply.content[IFCA_RECORD].get("losses", [])
            if len(losses) == self.clusters:
                fits.append((float(losses[cluster]), cluster, reply.content))
        states = unpack(self._current, self.clusters)
        for cluster, contents in groups.items():
            average = aggregate_arrayrecords(contents, self.weighted_by_key)
            states[cluster] = {name: array.numpy() for name, array in average.items()}
        self.membership[server_round] = dict(sorted(members.items()))
        self._reseed_empty(server_round, states, groups, fits)
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        return pack(states), metrics

    def _reseed_empty(self, server_round: int, states: list[dict], groups: dict, fits: list) -> None:
        """A cluster no client chose this round restarts from the trained model of the client its
        own cluster fits worst (highest loss), taken from a cluster it shares with others: the
        k-means remedy for an empty cluster (restart it at the worst-explained point). Without
        it a cluster whose random start never wins a client stays dead, and two groups share a
        model for good."""
        empty = [j for j in range(self.clusters) if j not in groups]
        candidates = sorted((f for f in fits if len(groups[f[1]]) > 1), key=lambda f: -f[0])
        for j, (_, _, content) in zip(empty, candidates):
            states[j] = {name: array.numpy() for name, array in content["arrays"].items()}
            self.reseeded.setdefault(server_round, {})[j] = int(content[NODE_RECORD][PARTITION_KEY]) if NODE_RECORD in content else -1
            log(WARNING, "ifca: no client chose cluster %d in round %d; restarted it from the worst-fitting client's model", j, server_round)


def agreement(membership: dict[int, int], truth: dict[int, int]) -> float:
    """Adjusted Rand index of the clusters clients chose against their true groups: 1.0 when
    the clustering recovers the groups exactly (cluster numbers may differ), ~0 for chance."""
    from sklearn.metrics import adjusted_rand_score

    clients = sorted(set(membership) & set(truth))
    if not clients:
        return float("nan")
    return float(adjusted_rand_score([truth[c] for c in clients], [membership[c] for c in clients]))


def write_membership(directory: Path, membership: dict[int, dict[int, int]], truth: dict[int, int] | None) -> Path:
    """``clusters.json`` (round -> client -> cluster, with the true groups when known) and
    ``clusters.png``, the membership of every client in every round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = {
        "membership": {str(r): {str(c): k for c, k in m.items()} for r, m in membership.items()},
        "true_groups": {str(c): g for c, g in (truth or {}).items()},
        "agreement": {str(r): agreement(m, truth) for r, m in membership.items()} if truth else {},
    }
    path = directory / "clusters.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    rounds = sorted(membership)
    clients = sorted({c for m in membership.values() for c in m})
    grid = np.full((len(clients), len(rounds)), np.nan)
    for column, r in enumerate(rounds):
        for row, c in enumerate(clients):
            grid[row, column] = membership[r].get(c, np.nan)
    fig, axis = plt.subplots(figsize=(6, 0.25 * len(clients) + 1.5), dpi=100)
    image = axis.imshow(grid, aspect="auto", interpolation="nearest", cmap="tab10", vmin=0, vmax=9)
    axis.set_xlabel("round")
    axis.set_ylabel("client (true group)" if truth else "client")
    axis.set_xticks(range(len(rounds)), [str(r) for r in rounds], fontsize=7)
    labels = [f"{c} ({truth[c]})" if truth and c in truth else str(c) for c in clients]
    axis.set_yticks(range(len(clients)), labels, fontsize=7)
    axis.set_title("ifca: cluster each client trained")
    fig.colorbar(image, ax=axis, label="cluster")
    fig.tight_layout()
    fig.savefig(directory / "clusters.png")
    plt.close(fig)
    return path


def true_groups(config) -> dict[int, int] | None:
    """Each client's true group, where the dataset knows it (rotated-digits' rotations)."""
    from fedlearn import data

    if config.dataset != "rotated-digits":
        return None
    return {p: data.rotation_group(config, p) for p in range(config.num_clients)}


class IFCAFamily(FedAvgFamily):
    """Both halves of IFCA: the clusters travel packed; a client trains the one that fits it."""

    def build(self, config, **common) -> IFCA:
        return IFCA(clusters=config.cluster_count(), **common)

    def initial_arrays(self, config, template: dict) -> ArrayRecord:
        return initial_arrays(config)

    def update_check(self, config, strategy: IFCA, template: ArrayRecord) -> UpdateCheck:
        """A plain update of one cluster model, and a valid cluster number."""
        def check(content: RecordDict) -> None:
            check_plain_update(content, template)
            strategy.check_reply(content)
        return check

    def round_facts(self, config, strategy: IFCA, server_round: int) -> tuple[dict, dict]:
        """The cluster each client trained this round, and how well that recovers the true groups."""
        if server_round not in strategy.membership:
            return {}, {}
        membership = strategy.membership[server_round]
        facts = {"membership": {str(c): k for c, k in membership.items()}}
        restarted = strategy.reseeded.get(server_round)
        if restarted:
            facts["restarted"] = {str(j): p for j, p in restarted.items()}  # cluster -> client whose model restarted it
        truth = true_groups(config)
        if truth is None:
            return {"clusters": facts}, {}
        facts["agreement"] = agreement(membership, truth)
        return {"clusters": facts}, {"cluster_agreement": facts["agreement"]}

    def finish(self, config, store, strategy: IFCA, final: ArrayRecord, sees_aggregate: bool) -> None:
        write_membership(store.directory, strategy.membership, true_groups(config))

    def _chosen(self, local: ClientRound) -> tuple[torch.nn.Module, ConfigRecord]:
        """The cluster model with the lowest loss on this node's training data (never on its test
        data), and the record that tells the server which one it is."""
        modules = load_cluster_models(local.arrays, local.config)
        cluster, losses = choose_cluster(modules, local.task.split, select_device(local.config.device))
        return modules[cluster], cluster_record(cluster, losses)

    def model(self, local: ClientRound) -> torch.nn.Module:
        return self._chosen(local)[0]

    def client_update(self, local: ClientRound) -> LocalUpdate:
        model, record = self._chosen(local)
        result = local.train(model)
        return LocalUpdate(detached(model.state_dict()), result, {IFCA_RECORD: record})


def config_problems(config) -> list[str]:
    if config.clusters and config.clusters < 2:
        return [f"clusters={config.clusters}: must be >= 2 (1 cluster is fedavg), or 0 for auto"]
    return []
