"""One typed, validated run configuration.

The same flat kebab-case keys work as Flower run-config (``flwr run . --run-config``),
in ``[tool.flwr.app.config]``, in TOML presets and on ``fedlearn simulate --run-config``.
Everything is checked before any work starts; every problem gets one line that names the
key, the bad value and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedlearn import families, privacy, recipes
from fedlearn.errors import ConfigError

SEED_MAX = 2**32 - 1  # scikit-learn's random_state takes no more (numpy's legacy seeding neither)
OPTIMIZERS = ("sgd", "momentum", "adam")
PARTITIONERS = ("iid", "dirichlet", "shards")
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "bf16", "fp16", "off")  # CUDA only: CPU training is always fp32
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")  # torch.compile's modes
HE_SCHEMES = ("bfv", "ckks")
EVALUATE_ON = ("auto", "server", "clients")
# Strategy families live in fedlearn.families, privacy modes in fedlearn.privacy (the registries,
# which also hold the checks peculiar to each); both are light, so reading a config imports
# neither torch nor Flower.
DATASETS = ("digits", "rotated-digits", "mnist", "fashion-mnist", "cifar10", "synthetic32", "synthetic-users")
MODELS = ("logreg", "mlp", "mnist-2nn", "mnist-cnn", "vision-cnn")
MODEL_INITS = ("pytorch", "glorot-uniform", "truncated-normal")  # fedlearn.models.initialise

# Keys Flower adds to the ConfigRecord it sends to clients; not user configuration.
TRANSPORT_KEYS = frozenset({"server-round", "ask"})


def key(default: Any, help: str) -> Any:
    """A RunConfig field: its default and its help text, the one source of both (key_reference)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunConfig:
    """A complete, validated run. Field ``foo_bar`` is the key ``foo-bar``."""

    num_rounds: int = key(10, "rounds of federated training")
    num_clients: int = key(10, "simulated clients, one per data partition")
    fraction_train: float = key(1.0, "fraction of the clients sampled to train each round (McMahan's C), in (0, 1]")
    fraction_evaluate: float = key(
        0.0, "fraction of the clients sampled for federated evaluation (0: none, or all when clients are the only evaluators)"
    )
    min_available_clients: int = key(2, "clients that must be connected before a round samples any")
    local_epochs: int = key(0, "local epochs each client trains per round (E) (0: the recipe for the model and dataset)")
    batch_size: int = key(0, "local batch size (B) (0: the recipe for the model and dataset)")
    lr: float = key(0.0, "client learning rate (0: the recipe for the model and dataset)")
    optimizer: str = key(
        "auto", "client optimizer: sgd, momentum (SGD with the momentum key) or adam (auto: the recipe for the model and dataset)"
    )
    momentum: float = key(0.9, "optimizer=momentum: momentum, in [0, 1)")
    weight_decay: float = key(0.0, "L2 penalty, as the optimizer's weight decay (0: off)")
    l1: float = key(0.0, "L1 penalty added to the local loss (0: off)")
    clip_grad_norm: float = key(0.0, "clip each local gradient to this L2 norm (0: off)")
    lr_decay: float = key(1.0, "per-round learning-rate decay: round r trains with lr * lr-decay^(r-1) (1: none)")
    proximal_mu: float = key(0.0, "strategy=fedprox: weight of the proximal term, must be > 0 there (0 for every other strategy)")
    server_lr: float = key(1.0, "server learning rate of fedavgm, and eta of fedadam, fedyogi and fedadagrad")
    server_momentum: float = key(0.9, "strategy=fedavgm: server momentum, in [0, 1)")
    trimmed_beta: float = key(0.2, "strategy=fedtrimmedavg: fraction of the updates cut at each end, in [0, 0.5)")
    krum_malicious: int = key(0, "strategy=krum: malicious clients to tolerate")
    dataset: str = key("digits", f"dataset: {', '.join(DATASETS)}")
    rotations: int = key(
        0, "dataset=rotated-digits: client groups, group g seeing the digits turned by g x 360/rotations degrees (0: 4)"
    )
    data_dir: str = key("", "directory holding the dataset files (empty: $FEDLEARN_DATA_DIR)")
    partitioner: str = key(
        "iid", "how the training data is split among clients: iid, dirichlet (label skew) or shards (McMahan's pathological non-IID)"
    )
    dirichlet_alpha: float = key(0.5, "partitioner=dirichlet: concentration of the label skew (smaller: more skew)")
    shards_per_client: int = key(2, "partitioner=shards: label-sorted shards each client gets")
    input_scaling: str = key(
        "standard", "mnist, fashion-mnist and cifar10 pixels: standard (mean 0, std 1 per channel) or unit ([0, 1] only, as in "
        "the early federated papers)"
    )
    test_fraction: float = key(0.2, "share of the data held out as the test split, for datasets without a fixed one (digits)")
    local_test_fraction: float = key(
        0.0, "share of each client's own data held out as its test set (0: a slice of the common test split); needs evaluate-on=clients or auto"
    )
    model: str = key("mlp", f"model architecture: {', '.join(MODELS)}")
    model_init: str = key(
        "pytorch", "initial weights: pytorch (the layers' defaults), glorot-uniform (Keras's default) or truncated-normal "
        "(N(0, 0.1) cut at 2 std, biases 0.1: the TensorFlow MNIST tutorials of 2015-16)"
    )
    mlp_hidden: int = key(64, "model=mlp: hidden units (128 on MNIST: ~100k parameters)")
    strategy: str = key("fedavg", f"aggregation strategy: {', '.join(families.names())}")
    clusters: int = key(0, "strategy=ifca: cluster models (0: the rotations of rotated-digits, else 2)")
    personal_layers: int = key(0, "strategy=fedper: last layers each client keeps to itself (0: 1, the classifier)")
    models: str = key(
        "", "comma-separated architectures: multimodel's models; fedmd's, given to clients in turn by partition id (empty: model)"
    )
    models_per_client: int = key(
        0, "strategy=multimodel: models each client trains per round, in turn (0: all of them; under secagg or he it must be all)"
    )
    buffer_size: int = key(0, "strategy=fedbuff: client updates per server update (0: half the clients)")
    staleness_exponent: float = key(
        0.5, "strategy=fedbuff: an update s server updates old weighs (1 + s) ** -exponent (0: stale updates count fully)"
    )
    public_size: int = key(0, "strategy=fedmd: training examples set aside as the public unlabeled set (0: a tenth)")
    distill_epochs: int = key(1, "strategy=fedmd: epochs of distillation towards the consensus per round (0: local-only training)")
    distill_lr: float = key(0.001, "strategy=fedmd: Adam learning rate of the distillation")
    consensus_temperature: float = key(
        0.5, "strategy=fedmd: T sharpens the consensus to p ** (1/T) before it is distilled (< 1 sharpens; 1: as averaged, as in FedMD)"
    )
    privacy: str = key(
        "secagg",
        "how updates reach the server: secagg (masked, the server sees only the sum), he (homomorphically encrypted), "
        "he-threshold (encrypted under a key a quorum of key holders shares) or plain (in clear)",
    )
    seed: int = key(42, "seeds model init, data split, partitioning, client sampling and shuffling")
    device: str = key("auto", "where clients train: auto (CUDA if present), cpu or cuda")
    round_timeout: float = key(600.0, "seconds to wait for client replies each round")
    max_update_mb: float = key(
        0.0, "largest update a node may send, in MiB; bigger replies are rejected and audited (0: 128 bytes per parameter + 1 MiB)"
    )
    target_accuracy: float = key(0.0, "stop once test accuracy reaches this, in [0, 1] (0: run all rounds)")
    out_dir: str = key("runs", "parent directory of run directories")
    resume_from: str = key("", "a run directory: continue that run from its checkpoint, under its own config (empty: a new run)")
    access_policy: str = key("", "access policy TOML file (empty: a per-run policy and keys are generated, simulation only)")
    run_signature: str = key("", "operator's signature of this config's digest, from fedlearn keys authorize; needs access-policy")
    audit_key: str = key("", "server's audit signing key file (empty: generated in the run directory)")
    node_keys_dir: str = key("", "where nodes without node-key in their node config find node-<partition-id>.key")
    evaluate_on: str = key(
        "auto",
        "who evaluates: server (the test split), clients (their test shards) or auto (server; clients under he, ifca, "
        "fedper, fedmd or with local-test-fraction)",
    )
    he_scheme: str = key("bfv", "privacy=he: bfv (quantized, packed fixed point) or ckks (approximate floats)")
    he_bits: int = key(16, "privacy=he with bfv: fixed-point bits per parameter per client, 2 to 30 (8 halves the bytes)")
    he_range: float = key(0.0, "privacy=he with bfv: clip each tensor to he-range x its largest global value (0: 2**(he-bits/4))")
    he_workers: int = key(1, "privacy=he: processes each client encrypts with in parallel (set to the node's cores for big models)")
    he_public: str = key("", "privacy=he: the server's public HE context file (empty: a key pair is generated per run, simulation)")
    he_secret: str = key("", "privacy=he: the clients' secret HE context file (a node may set its own in --node-config)")
    secagg_bits: int = key(
        16, "privacy=secagg: bits per masked value uploaded, 8 to 32; the round's sum must fit (headroom comes out of the value bits)"
    )
    secagg_range: float = key(
        0.0, "privacy=secagg: clip each tensor to secagg-range x its largest global value (0: 2**(value bits/4))"
    )
    secagg_threshold: int = key(0, "privacy=secagg: shares that unmask a client (0: a strict majority of its neighbourhood)")
    secagg_neighbours: int = key(0, "privacy=secagg: SecAgg+ neighbours each client masks with (0: every other client)")
    secagg_timeout: float = key(
        120.0, "privacy=secagg: seconds for each key stage (advertise, share, consistency, unmask); training waits round-timeout"
    )
    threshold_committee: int = key(
        3, "privacy=he-threshold: key holders sharing the decryption key, chosen among keyholder nodes (2 to num-clients)"
    )
    threshold_quorum: int = key(
        0, "privacy=he-threshold: committee members that must take part to decrypt, at least 2 (0: a majority of the committee)"
    )
    threshold_range: float = key(
        0.0, "privacy=he-threshold: clip each tensor to threshold-range x its largest global value (0: 2**(value bits/4))"
    )
    threshold_timeout: float = key(120.0, "privacy=he-threshold: seconds for each key-ceremony and decryption stage")
    dropout_rate: float = key(0.0, "fault injection: seeded fraction of the sampled clients that vanish each round, in [0, 1) (0: none)")
    dropout_stage: str = key(
        "train", "where injected dropouts strike: train; under secagg also advertise, share, consistency, unmask; under he-threshold decrypt"
    )
    slow_fraction: float = key(
        0.0, "simulated stragglers: seeded fraction of the clients whose training replies take slow-seconds longer (0: none)"
    )
    slow_seconds: float = key(0.0, "seconds each straggler's training reply takes longer (set with slow-fraction, or neither)")
    client_resources_num_cpus: float = key(1.0, "simulation: CPUs each simulated client reserves in Ray (fewer: more clients at once)")
    client_resources_num_gpus: float = key(
        0.0, "simulation: share of a GPU each simulated client reserves in Ray (0.1: ten clients share one; 0: none)"
    )
    ray_address: str = key(
        "", "simulation: the Ray cluster the simulated clients run on: host:port of its head (ray start --head), or auto "
        "(the one running on this machine); empty: a Ray runtime of this process"
    )
    amp: str = key(
        "auto", "mixed precision on CUDA: auto (bf16 where supported, else fp16 with a gradient scaler), bf16, fp16 or off; CPU is fp32"
    )
    compile: str = key("off", "torch.compile the model for local training in this mode: default, reduce-overhead or max-autotune (off: eager)")
    ddp_world_size: int = key(
        1, "processes that train each client's local epochs with DistributedDataParallel (1: no DDP; not for fedmd, multimodel)"
    )

    def __post_init__(self) -> None:
        """Fill optimizer=auto, lr=0, local-epochs=0 and batch-size=0 from the model's and
        dataset's recipe (fedlearn.recipes), so that every run holds and records real values."""
        recipe = recipes.recommended(self.model, self.dataset).values()
        for name, auto in recipes.AUTO.items():
            if getattr(self, name) == auto:
                object.__setattr__(self, name, recipe[name])

    def recipe_fields(self) -> list[str]:
        """The training fields whose values are the recipe's (what a user left unset, or set alike)."""
        recipe = recipes.recommended(self.model, self.dataset).values()
        return [name for name in recipes.AUTO if getattr(self, name) == recipe[name]]

    # -- conversions ---------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [_key(f.name) for f in fields(cls)]

    def to_flat(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], *, base: RunConfig | None = None) -> RunConfig:
        """Build from flat kebab-case keys over ``base`` (defaults when None); validate."""
        types = {f.name: f.type for f in fields(cls)}
        # Over the fields' own defaults (not cls(): its recipe values would follow mlp on the digits).
        values = dataclasses.asdict(base) if base else {f.name: f.default for f in fields(cls)}
        if base is not None and ({"model", "dataset"} & set(flat)):
            # Another model or dataset: the keys that followed the old recipe follow the new one.
            for name in base.recipe_fields():
                values[name] = recipes.AUTO[name]
        problems: list[str] = []
        for key, raw in flat.items():
            if key in TRANSPORT_KEYS:
                continue
            name = key.replace("-", "_")
            if name not in types:
                hint = _closest(key, cls.keys())
                problems.append(
                    f"unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")
                    + "; run `fedlearn simulate --list-keys` for every key"
                )
                continue
            try:
                values[name] = _coerce(raw, types[name])
            except NotFinite:
                problems.append(f"{key}={raw!r}: must be a finite number, not nan or inf")
            except (TypeError, ValueError):
                problems.append(f"{key}={raw!r}: expected {types[name]}")
        if problems:
            raise ConfigError(problems)
        config = cls(**values)
        config.validate()
        return config

    def train_sample_size(self) -> int:
        """Clients sampled per training round with all num-clients connected (as Flower samples)."""
        return max(int(self.num_clients * self.fraction_train), self.min_available_clients)

    def replace(self, **overrides: Any) -> RunConfig:
        return RunConfig.from_flat({_key(k): v for k, v in overrides.items()}, base=self)

    def digest(self, exclude: tuple[str, ...] = ()) -> str:
        """SHA-256 of the canonical JSON of the resolved config (for records and audit)."""
        flat = {k: v for k, v in self.to_flat().items() if k not in exclude}
        canonical = json.dumps(flat, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_toml(self) -> str:
        lines = [f"{k} = {_toml_value(v)}" for k, v in self.to_flat().items()]
        return "\n".join(lines) + "\n"

    def max_update_bytes(self, parameters: int) -> int:
        """The size limit of one update: room for CKKS ciphertexts (~81 B/param) by default."""
        if self.max_update_mb:
            return int(self.max_update_mb * 2**20)
        return 128 * parameters + 2**20

    def he_range_factor(self) -> float:
        """Room for local models to outgrow the global one before clipping: by default a quarter of
        the bits (x16 at 16 bits, x4 at 8), so precision and headroom shrink together."""
        return self.he_range or float(2 ** (self.he_bits // 4))

    def secagg_neighbourhood(self, sampled: int) -> int:
        """Clients in each neighbourhood (itself included) when ``sampled`` take part."""
        if self.secagg_neighbours == 0 or self.secagg_neighbours >= sampled - 1:
            return sampled
        return 2 * -(-self.secagg_neighbours // 2) + 1

    def secagg_threshold_for(self, sampled: int) -> int:
        """Shares needed to unmask: secagg-threshold, or a strict majority of a neighbourhood, so
        that the server cannot collect both secrets of one client from two disjoint groups."""
        return self.secagg_threshold or max(2, self.secagg_neighbourhood(sampled) // 2 + 1)

    def secagg_encoding(self, sampled: int):
        """The fixed-point encoding whose sum over ``sampled`` clients fits in secagg-bits."""
        from crypto.fixedpoint import FixedPoint

        return FixedPoint.widest(self.secagg_bits, sampled)

    def secagg_range_factor(self, value_bits: int) -> float:
        return self.secagg_range or float(2 ** (value_bits // 4))

    def threshold_quorum_size(self) -> int:
        """Members whose partial decryptions (or recovered shares) a decryption needs."""
        return self.threshold_quorum or self.threshold_committee // 2 + 1

    def threshold_encoding(self, sampled: int):
        """The fixed-point encoding whose sum over ``sampled`` clients decrypts exactly."""
        from crypto.fixedpoint import FixedPoint
        from crypto.threshold import SUM_BITS

        return FixedPoint.widest(SUM_BITS, sampled)

    def threshold_range_factor(self, value_bits: int) -> float:
        return self.threshold_range or float(2 ** (value_bits // 4))

    def evaluates_on_clients(self) -> bool:
        return self.evaluate_on == "clients" or (
            self.evaluate_on == "auto"
            and (
                not self._mode().sees_aggregate
                or bool(self._family().server_cannot_evaluate)
                or self.local_test_fraction > 0
            )
        )

    def _mode(self) -> privacy.PrivacyMode:
        """The privacy mode's traits (plain's for a name the registry lacks: validate reports it)."""
        return privacy.get(self.privacy) if self.privacy in privacy.names() else privacy.get("plain")

    def _family(self) -> families.Family:
        """The strategy's traits (FedAvg's for an unknown name: validate reports it)."""
        return families.find(self.strategy) or families.get("fedavg")

    def applies(self, key: str) -> bool:
        """Whether a strategy-specific key applies to this run's strategy."""
        return key in self._family().keys

    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()] or [self.model]

    def public_size_count(self) -> int:
        """Examples in fedmd's public set (0 for every other strategy)."""
        if not self.applies("public-size"):
            return 0
        if self.public_size:
            return self.public_size
        from fedlearn import data

        return max(1, data.spec(self.dataset).approx_train_size(self.test_fraction) // 10)

    def buffer_count(self) -> int:
        """Updates per fedbuff server update."""
        return self.buffer_size or max(1, self.num_clients // 2)

    def is_slow(self, partition_id: int) -> bool:
        """Whether a client is one of the simulated stragglers (a seeded choice of partitions)."""
        import random

        count = int(self.slow_fraction * self.num_clients + 0.5)
        return partition_id in random.Random(f"slow/{self.seed}").sample(range(self.num_clients), count)

    def personal_layer_count(self) -> int:
        """Layers a fedper client keeps to itself (0 for every other strategy)."""
        if not self.applies("personal-layers"):
            return 0
        return self.personal_layers or 1

    def rotation_count(self) -> int:
        """Client groups of rotated-digits (1 for every other dataset)."""
        if self.dataset != "rotated-digits":
            return 1
        return self.rotations or 4

    def cluster_count(self) -> int:
        """Cluster models of ifca: clusters, or by default one per rotation of rotated-digits."""
        if self.clusters:
            return self.clusters
        return self.rotation_count() if self.dataset == "rotated-digits" else 2

    def evaluation_fraction(self) -> float:
        """Fraction of clients sampled to evaluate: all of them when clients are the only evaluators
        and fraction-evaluate is 0."""
        if self.evaluates_on_clients() and self.fraction_evaluate == 0:
            return 1.0
        return self.fraction_evaluate

    # -- validation ----------------------------------------------------------------
    def _strategy_problems(self) -> list[str]:
        """The generic checks that follow from the families' traits, then the run's family's own."""
        problems = []
        family = self._family()
        if not self._mode().sees_updates and family.needs_clear_updates:
            problems.append(
                f"strategy={self.strategy} cannot run with privacy={self.privacy}: {family.needs_clear_updates}; "
                "set privacy=plain"
            )
        if self.evaluate_on == "server" and family.server_cannot_evaluate:
            problems.append(
                f"evaluate-on=server cannot work with strategy={self.strategy}: {family.server_cannot_evaluate}; "
                "use evaluate-on=clients (or auto)"
            )
        owners: dict[str, list[str]] = {}
        for other in families.all_families():
            for key in other.keys:
                owners.setdefault(key, []).append(other.name)
        for key, names in owners.items():
            value = getattr(self, key.replace("-", "_"))
            if self.strategy not in names and value != getattr(RunConfig, key.replace("-", "_")):
                problems.append(f"{key}={value} only applies to strategy={' or '.join(names)}")
        if self.ddp_world_size > 1 and not family.one_model:
            problems.append(
                f"ddp-world-size={self.ddp_world_size} with strategy={self.strategy}: a client trains several models "
                f"(or distils) there; DDP applies to one model's local epochs "
                f"({', '.join(families.named(lambda f: f.one_model))})"
            )
        if self.strategy in families.names():
            problems += family.problems(self)
        return problems

    def _run_problems(self) -> list[str]:
        problems = []
        if not 0.0 <= self.local_test_fraction < 1.0:
            problems.append(f"local-test-fraction={self.local_test_fraction}: must be in [0, 1) (0 = test on the common test split)")
        elif self.local_test_fraction > 0 and self.evaluate_on == "server":
            problems.append(
                f"local-test-fraction={self.local_test_fraction} holds out test data on the clients: "
                "use evaluate-on=clients (or auto), the server has none of it"
            )
        if self.rotations and self.dataset != "rotated-digits":
            problems.append(f"rotations={self.rotations} only applies to dataset=rotated-digits")
        elif self.rotations < 0 or self.rotations > self.num_clients:
            problems.append(
                f"rotations={self.rotations}: must be between 1 and num-clients={self.num_clients} "
                "(every rotation needs a client), or 0 for 4"
            )
        if not 0.0 <= self.slow_fraction <= 1.0:
            problems.append(f"slow-fraction={self.slow_fraction}: must be in [0, 1]")
        if self.slow_seconds < 0 or (self.slow_seconds > 0) != (self.slow_fraction > 0):
            problems.append(
                f"slow-fraction={self.slow_fraction} and slow-seconds={self.slow_seconds}: set both (stragglers and "
                "their delay) or neither"
            )
        if self.client_resources_num_cpus <= 0:
            problems.append(f"client-resources-num-cpus={self.client_resources_num_cpus}: must be > 0")
        if self.client_resources_num_gpus < 0:
            problems.append(f"client-resources-num-gpus={self.client_resources_num_gpus}: must be >= 0 (a share of one GPU, e.g. 0.1)")
        if not 1 <= self.ddp_world_size <= 64:
            problems.append(f"ddp-world-size={self.ddp_world_size}: must be between 1 (no DDP) and 64 processes")
        return problems

    def _privacy_problems(self) -> list[str]:
        """The generic checks that follow from the modes' traits, then the run's mode's own."""
        problems = []
        owners = {stage: mode.name for mode in privacy.modes() for stage in mode.stages}  # a mode's own stages
        if self.dropout_stage != "train" and self.dropout_stage not in owners:
            problems.append(f"dropout-stage={self.dropout_stage!r}: choose one of {', '.join(['train', *owners])}")
        elif owners.get(self.dropout_stage, self.privacy) != self.privacy:
            owner = owners[self.dropout_stage]
            problems.append(f"dropout-stage={self.dropout_stage} is a stage of privacy={owner}: it needs privacy={owner} (use train)")
        for mode in privacy.modes():
            for key in mode.keys if mode.name != self.privacy else ():
                if getattr(self, key.replace("-", "_")) != getattr(RunConfig, key.replace("-", "_")):
                    problems.append(f"{key} only applies to privacy={mode.name}")
        if self.privacy in privacy.names():
            problems += self._mode().problems(self)
        return problems

    def _per_user_problems(self) -> list[str]:
        """A dataset whose clients are its users: no pool to split, to share or to size."""
        problems = []
        if self.partitioner != "iid":
            problems.append(f"partitioner={self.partitioner}: {self.dataset} comes split by user (each client is one); "
                            "leave partitioner=iid")
        if self.applies("public-size"):
            problems.append(f"strategy={self.strategy} draws a public set from a pooled training set, which "
                            f"{self.dataset} has not: use another dataset")
        return problems

    def validate(self) -> None:
        from fedlearn import data, models  # registries know their own constraints

        problems: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        def choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
            need(value in allowed, f"{key}={value!r}: choose one of {', '.join(allowed)}")

        for key in ("num-rounds", "num-clients", "local-epochs", "batch-size", "shards-per-client", "mlp-hidden"):
            value = getattr(self, key.replace("-", "_"))
            need(value >= 1, f"{key}={value}: must be >= 1")
        need(0.0 < self.fraction_train <= 1.0, f"fraction-train={self.fraction_train}: must be in (0, 1]")
        need(0.0 <= self.fraction_evaluate <= 1.0, f"fraction-evaluate={self.fraction_evaluate}: must be in [0, 1]")
        need(self.lr > 0, f"lr={self.lr}: must be > 0")
        need(0.0 < self.lr_decay <= 1.0, f"lr-decay={self.lr_decay}: must be in (0, 1] (1 = no decay)")
        need(0.0 <= self.momentum < 1.0, f"momentum={self.momentum}: must be in [0, 1)")
        need(0.0 <= self.server_momentum < 1.0, f"server-momentum={self.server_momentum}: must be in [0, 1)")
        need(self.server_lr > 0, f"server-lr={self.server_lr}: must be > 0")
        for key in ("weight-decay", "l1", "clip-grad-norm", "proximal-mu", "krum-malicious"):
            value = getattr(self, key.replace("-", "_"))
            need(value >= 0, f"{key}={value}: must be >= 0 (0 turns it off)")
        need(0 <= self.seed <= SEED_MAX, f"seed={self.seed}: must be between 0 and {SEED_MAX} (numpy and scikit-learn's range)")
        need(self.dirichlet_alpha > 0, f"dirichlet-alpha={self.dirichlet_alpha}: must be > 0")
        need(0.0 < self.test_fraction < 1.0, f"test-fraction={self.test_fraction}: must be in (0, 1)")
        need(0.0 <= self.target_accuracy <= 1.0, f"target-accuracy={self.target_accuracy}: must be in [0, 1] (0 = off)")
        need(self.round_timeout > 0, f"round-timeout={self.round_timeout}: must be > 0 seconds")
        need(self.max_update_mb >= 0, f"max-update-mb={self.max_update_mb}: must be >= 0 (0 picks a limit from the model size)")
        need(bool(self.out_dir.strip()), "out-dir is empty: give a directory for run results")
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("partitioner", self.partitioner, PARTITIONERS)
        choice("device", self.device, DEVICES)
        choice("amp", self.amp, AMP_MODES)
        choice("compile", self.compile, COMPILE_MODES)
        choice("strategy", self.strategy, families.names())
        choice("dataset", self.dataset, DATASETS)
        choice("model", self.model, MODELS)
        choice("model-init", self.model_init, MODEL_INITS)
        choice("input-scaling", self.input_scaling, data.INPUT_SCALINGS)
        need(self.input_scaling == "standard" or self.dataset not in DATASETS or self.dataset in data.NORMALISATION,
             f"input-scaling={self.input_scaling} with dataset={self.dataset}: only the image files "
             f"({', '.join(data.NORMALISATION)}) are rescaled; leave input-scaling=standard")
        choice("privacy", self.privacy, privacy.names())
        choice("evaluate-on", self.evaluate_on, EVALUATE_ON)
        choice("he-scheme", self.he_scheme, HE_SCHEMES)
        need(2 <= self.he_bits <= 30, f"he-bits={self.he_bits}: must be between 2 and 30 (16 is the default, 8 halves the bytes)")
        need(self.he_workers >= 1, f"he-workers={self.he_workers}: must be >= 1 (1 encrypts in the client process)")
        need(self.he_range >= 0, f"he-range={self.he_range}: must be > 0 (a multiple of each tensor's largest value), or 0 for auto")
        need(self.secagg_range >= 0, f"secagg-range={self.secagg_range}: must be > 0 (a multiple of each tensor's largest value), or 0 for auto")
        need(self.secagg_timeout > 0, f"secagg-timeout={self.secagg_timeout}: must be > 0 seconds")
        need(0.0 <= self.dropout_rate < 1.0, f"dropout-rate={self.dropout_rate}: must be in [0, 1) (0 = no injected dropouts)")
        problems += self._strategy_problems()
        problems += self._run_problems()
        problems += self._privacy_problems()
        need(
            not self.run_signature or bool(self.access_policy),
            "run-signature is set but access-policy is not: give the policy that lists the signing operator",
        )
        need(0.0 <= self.trimmed_beta < 0.5, f"trimmed-beta={self.trimmed_beta}: must be in [0, 0.5)")

        # Combinations.
        need(
            self.min_available_clients <= self.num_clients,
            f"min-available-clients={self.min_available_clients} exceeds num-clients={self.num_clients}",
        )
        need(self.min_available_clients >= 1, "min-available-clients must be >= 1")
        reason = (models.incompatibility(self.model, data.spec(self.dataset).shape)
                  if self.model in MODELS and self.dataset in DATASETS else None)
        if reason:
            problems.append(f"model={self.model} with dataset={self.dataset}: {reason}")
        if self.dataset in DATASETS and data.spec(self.dataset).per_user:
            problems += self._per_user_problems()
        elif self.dataset in DATASETS:
            spec = data.spec(self.dataset)
            train_size = spec.approx_train_size(self.test_fraction)
            if self.partitioner == "shards":
                shards = self.num_clients * self.shards_per_client
                need(
                    shards <= train_size,
                    f"partitioner=shards needs num-clients x shards-per-client = {shards} shards, "
                    f"but {self.dataset} has only ~{train_size} training examples",
                )
            need(
                self.num_clients <= train_size,
                f"num-clients={self.num_clients} exceeds the {train_size} training examples of {self.dataset}",
            )
            if not spec.fixed_test_split:
                test_size = spec.train_size - train_size
                need(
                    test_size >= spec.num_classes and train_size >= spec.num_classes,
                    f"test-fraction={self.test_fraction} leaves {test_size} test and {train_size} training "
                    f"examples of {self.dataset}; each split needs at least one per class ({spec.num_classes})",
                )
        if problems:
            raise ConfigError(problems)


def _key(name: str) -> str:
    return name.replace("_", "-")


class NotFinite(ValueError):
    """A float key given nan or inf."""


def _coerce(raw: Any, type_name: str) -> Any:
    if type_name == "int":
        if isinstance(raw, bool):
            raise TypeError
        if isinstance(raw, float):
            if not raw.is_integer():
                raise ValueError
            return int(raw)
        return int(raw)
    if type_name == "float":
        if isinstance(raw, bool):
            raise TypeError
        value = float(raw)
        if not math.isfinite(value):
            raise NotFinite
        return value
    if type_name == "str":
        if not isinstance(raw, str):
            raise TypeError
        return raw
    raise TypeError(type_name)


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def _closest(key: str, candidates: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"k=v k2='text' k3=0.1"`` like Flower's ``--run-config`` (TOML values).

    Bare words that are not TOML values are taken as strings, so ``strategy=fedavg`` works.
    """
    result: dict[str, Any] = {}
    try:
        tokens = shlex.split(text)
    except ValueError as exc:  # shlex's own words: "No closing quotation"
        raise ConfigError([f"run-config {text!r}: {exc}; quote a value with spaces as key='a b'"]) from None
    for token in tokens:
        if "=" not in token:
            raise ConfigError([f"run-config item {token!r} is not key=value"])
        key, _, value = token.partition("=")
        key = key.strip()
        if key in result:
            raise ConfigError([f"run-config gives {key} twice; keep one {key}=..."])
        try:
            result[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            result[key] = value
    return result


MAX_TOML_BYTES = 8 << 20  # configs and policies are a few KB; a larger file is not one


def read_toml(path: Path, what: str = "config file", missing: str = "") -> dict[str, Any]:
    """A TOML file's table, or a ConfigError that names the file and what is wrong with it."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_TOML_BYTES:
            raise ConfigError([f"{what} {path} is {path.stat().st_size} bytes: not a {what} (they are a few KB)"])
        text = path.read_bytes().decode("utf-8")
        return tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError([f"{what} {path} does not exist" + (f": {missing}" if missing else "")]) from None
    except IsADirectoryError:
        raise ConfigError([f"{what} {path} is a directory: give the file"]) from None
    except OSError as exc:
        raise ConfigError([f"cannot read {what} {path}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{what} {path} is not UTF-8 text (byte {exc.start}): is it the right file?"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{what} {path} is not valid TOML: {exc}"]) from None


def load_toml(path: Path) -> dict[str, Any]:
    """Read a preset or config TOML file: flat keys at the top level."""
    table = read_toml(path)
    nested = [k for k, v in table.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError([f"{path}: keys must be flat (found tables {', '.join(nested)})"])
    return table


def resolve(
    preset: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None
) -> RunConfig:
    """Defaults <- preset <- overrides, validated once."""
    merged = dict(preset or {})
    merged.update(overrides or {})
    return RunConfig.from_flat(merged)


# -- the configuration reference: generated from RunConfig's fields --------------------------
@dataclass(frozen=True)
class KeyInfo:
    """One configuration key as the reference shows it."""

    key: str
    type: str
    default: Any
    help: str


def key_reference() -> list[KeyInfo]:
    """Every key in field order, with its type, default and help text (from ``key(default, help)``)."""
    return [KeyInfo(_key(f.name), f.type, f.default, f.metadata["help"]) for f in fields(RunConfig)]


def _markdown_cell(text: str) -> str:
    """Help text as one table cell: ``|`` would end the cell, ``*`` and ``<`` could start emphasis or HTML."""
    for char in "\\|*<":
        text = text.replace(char, "\\" + char)
    return text


def reference_markdown() -> str:
    """The configuration reference (docs/generated/config-keys.md): every key in field order."""
    lines = [
        "# Configuration keys",
        "",
        "Set them with `fedlearn simulate --run-config \"k=v\"`, in TOML presets, with `flwr run . --run-config` or in "
        "`[tool.flwr.app.config]`. Generated from `RunConfig` in `fedlearn/config.py` by "
        "`python -m fedlearn.config --markdown --write docs/generated/config-keys.md`: edit the fields, not this file.",
        "",
        "| key | type | default | what it does |",
        "|---|---|---|---|",
    ]
    for info in key_reference():
        lines.append(f"| `{info.key}` | {info.type} | `{_toml_value(info.default)}` | {_markdown_cell(info.help)} |")
    lines += [
        "",
        "## Recommended training",
        "",
        "What `optimizer=auto`, `lr=0`, `local-epochs=0` and `batch-size=0` (the defaults) become, from "
        "`fedlearn/recipes.py`; a run's `config.toml` records the values it used.",
        "",
    ]
    return "\n".join(lines) + "\n" + recipes.markdown_table(DATASETS)


def reference_text(width: int = 100) -> str:
    """Every ``key = default`` with its help text aligned beside it, wrapped to ``width`` columns
    (``fedlearn simulate --list-keys``)."""
    import textwrap

    infos = key_reference()
    lefts = [f"{info.key} = {info.default!r}" for info in infos]
    column = max(map(len, lefts)) + 2
    lines = []
    for left, info in zip(lefts, infos):
        parts = textwrap.wrap(info.help, max(30, width - column), break_long_words=False, break_on_hyphens=False) or [""]
        lines.append(f"{left:<{column}}{parts[0]}")
        lines += [" " * column + part for part in parts[1:]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m fedlearn.config --markdown [--write PATH]``: print or write the reference."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m fedlearn.config", description="The configuration reference.")
    parser.add_argument("--markdown", action="store_true", required=True, help="render it as markdown")
    parser.add_argument("--write", metavar="PATH", type=Path, help="write it to PATH instead of printing it")
    args = parser.parse_args(argv)
    text = reference_markdown()
    if args.write is None:
        sys.stdout.write(text)
    else:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
