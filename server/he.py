"""``HEStrategy``: gives a sum strategy ciphertexts instead of plaintext replies (privacy=he).

It wraps a Flower strategy (FedAvg: sampling, configuration, metrics) and replaces its
aggregation: the server adds the clients' ciphertexts with a keyless TenSEAL context and keeps
the result, encrypted, as the global model it sends out next. It holds no secret key, so no
code path here can decrypt (crypto.he refuses without one).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from crypto.he import Encrypted, HEKey, HEKeyError, generate_pair
from fedlearn.config import RunConfig
from fedlearn.encoding import MAX_RANGE_EXPONENT
from fedlearn.errors import ConfigError
from fedlearn.he import PREVIOUS_RECORD, ModelCodec, StateMeta, encrypted_record, record_chunks
from fedlearn.messages import HE_RECORD
from server.grid import round_weight_cap
from server.privacy import HidingStrategy


@dataclass
class RoundPlan:
    """What the contributions of one training round must agree on."""

    max_terms: int
    weight_cap: int
    exponents: tuple[int, ...] | None = None  # bfv ranges: those most of the round's contributions share


class HEStrategy(HidingStrategy):
    checkpointable = False  # the encrypted model and momentum are not in the checkpoint

    def __init__(self, inner: Strategy, config: RunConfig, template: dict[str, np.ndarray]):
        super().__init__(inner, config, template)
        key = load_public_key(config)  # the server reads the public context only
        if key is None or key.secret:
            raise ValueError("the server must hold the public HE context only")
        self.key = key
        self.codec = ModelCodec(key, template, config.he_bits, config.he_range_factor())
        self.momentum = config.strategy == "fedavgm"
        self.meta: StateMeta | None = None  # None while the global model is the clear initial one
        self._current: ArrayRecord | None = None  # the encrypted global model
        self.previous: tuple[ArrayRecord, StateMeta] | None = None  # fedavgm: the state before
        self.counts: dict[int, int] = {}  # node id -> training examples it reported
        self.plan: RoundPlan | None = None

    @classmethod
    def preflight(cls, config: RunConfig) -> None:
        load_public_key(config)  # a bad he-public fails before the run directory exists

    @classmethod
    def provision(cls, config: RunConfig, directory: Path) -> RunConfig:
        if load_public_key(config) is not None:
            return config
        return provision_he(directory, config)

    def save_model(self, store, arrays: dict[str, np.ndarray]) -> Path:
        """The final model as the server holds it: encrypted, with what decrypt-model needs."""
        return store.save_model(arrays, name="model.he.safetensors", metadata=self.state_metadata())

    def summary(self) -> None:
        log(INFO, "\t├── privacy: he (%s), the server adds ciphertexts only", self.key.info.scheme)
        self.inner.summary()

    # -- requests -------------------------------------------------------------------
    def _state_record(self) -> dict:
        state = {"context-id": self.key.info.context_id, "encrypted": self.meta is not None}
        if self.meta is not None:
            state.update(self.meta.to_record())
        if self.previous is not None:
            state.update(self.previous[1].to_record("previous-"))
        return state

    def _attach(self, messages: list[Message], extra: dict) -> None:
        for content in {id(m.content): m.content for m in messages}.values():
            content[HE_RECORD] = ConfigRecord({**self._state_record(), **extra})
            if self.previous is not None:
                content[PREVIOUS_RECORD] = self.previous[0]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        nodes = [m.metadata.dst_node_id for m in messages]
        cap = round_weight_cap(grid, nodes, self.counts, {**self.config.to_flat(), "server-round": server_round},
                               self.config.round_timeout)
        self.plan = RoundPlan(max_terms=len(nodes), weight_cap=cap)
        self._attach(messages, {"max-terms": self.plan.max_terms, "weight-cap": self.plan.weight_cap})
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self._attach(messages, {})
        return messages

    # -- replies --------------------------------------------------------------------
    def _parse(self, content: RecordDict) -> tuple[Encrypted, tuple[int, ...]]:
        if self.plan is None:
            raise ValueError("no training round is open")
        if HE_RECORD not in content or "arrays" not in content or not isinstance(content["arrays"], ArrayRecord):
            raise ValueError("not an encrypted update (no he record or no ciphertexts): is the node in privacy=he?")
        he = content[HE_RECORD]
        try:
            weight, exponents, clipped = float(he["weight"]), tuple(int(e) for e in he["range-exp"]), int(he["clipped"])
            examples = int(content["metrics"]["num-examples"])
            chunks = record_chunks(content["arrays"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"malformed encrypted update ({exc})") from None
        if weight != examples / self.plan.weight_cap or weight > 1:
            raise ValueError(f"weight {weight:g} is not num-examples {examples} / weight cap {self.plan.weight_cap}")
        tensors = len(self.codec.template) if self.key.info.scheme == "bfv" else 0
        if len(exponents) != tensors or any(abs(e) > MAX_RANGE_EXPONENT for e in exponents):
            raise ValueError(f"{len(exponents)} range exponents for {tensors} tensors, or one beyond 2**+-{MAX_RANGE_EXPONENT}")
        return Encrypted(chunks, weight, 1, clipped), exponents

    def check_reply(self, content: RecordDict) -> None:
        """Raise ValueError saying what is wrong with a training reply. Access control calls it on
        every reply before anything is aggregated; it deserialises each ciphertext once. Whether
        its ranges are the round's is decided once all replies are in (``_agreed``)."""
        encrypted, exponents = self._parse(content)
        self.codec.summer(self.plan.max_terms, exponents).check(encrypted)

    def _agreed(self, replies: list[Message]) -> tuple[list[Encrypted], list[dict]]:
        """The contributions encoded with the ranges most replies share (every honest client
        derives them from the same global model), and the others left out, with why: one client
        claiming other ranges first no longer decides the round's ranges and gets every honest
        update refused. A tie goes to the wider ranges (fewer values clipped)."""
        parsed = [(r.metadata.src_node_id, *self._parse(r.content)) for r in replies]
        votes = Counter(exponents for _, _, exponents in parsed)
        self.plan.exponents = max(votes, key=lambda e: (votes[e], e))
        kept = [encrypted for _, encrypted, exponents in parsed if exponents == self.plan.exponents]
        left_out = [{"node_id": node, "reason": f"its range exponents differ from the {votes[self.plan.exponents]} "
                     "replies that agree (another global model, or a client trying to set the round's ranges)"}
                    for node, _, exponents in parsed if exponents != self.plan.exponents]
        for entry in left_out:
            log(WARNING, "he: left out node %s's update: %s", entry["node_id"], entry["reason"])
        return kept, left_out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok = [r for r in replies if not r.has_error()]  # access control already rejected bad ones
        if not ok or self.plan is None:
            return None, None
        contributions, left_out = self._agreed(ok)
        summer = self.codec.summer(self.plan.max_terms, self.plan.exponents)
        total = summer.add(contributions)
        clipped = total.clipped
        arrays = encrypted_record(total.chunks)
        if self.momentum and self.meta is not None:
            self.previous = (self._current, self.meta)
        self.meta = StateMeta(total.terms, total.weight, self.plan.max_terms, self.plan.exponents)
        self._current = arrays
        if clipped:
            log(WARNING, "he: %d values were clipped to their range in round %d (raise he-range)", clipped, server_round)
        self.last = {
            **self.key.info.parameters(),
            "mode": "he",
            "terms": total.terms,
            "total_weight": total.weight,
            "weight_cap": self.plan.weight_cap,
            "clipped": clipped,
            "left_out": left_out,
            **self._encoding_facts(summer),
        }
        fn = getattr(self.inner, "train_metrics_aggr_fn", None)
        metrics = fn([r.content for r in ok], "num-examples") if fn else None
        return arrays, metrics

    def _encoding_facts(self, summer) -> dict:
        if self.key.info.scheme != "bfv":
            return {"max_terms": self.plan.max_terms}
        packing = summer.layout.packing(self.key)
        encoding = summer.layout.encoding()
        bound = float(np.max(encoding.error_bound(self.meta.terms, summer.ranges))) / self.meta.weight
        return {"bits": self.config.he_bits, "lane_bits": packing.lane_bits, "lanes": packing.lanes,
                "max_terms": self.plan.max_terms, "range_exponents": list(self.plan.exponents or ()),
                "error_bound": bound}


    def state_metadata(self) -> dict[str, str]:
        """What decrypt-model needs to read the final encrypted model (safetensors metadata)."""
        if self.meta is None:
            return {"encrypted": "false"}
        return {"encrypted": "true", "context_id": self.key.info.context_id, "scheme": self.key.info.scheme,
                "bits": str(self.config.he_bits), "terms": str(self.meta.terms), "weight": repr(self.meta.weight),
                "max_terms": str(self.meta.max_terms), "range_exp": ",".join(map(str, self.meta.exponents))}


def load_public_key(config: RunConfig) -> HEKey | None:
    """The server's public HE context from he-public (None: to be generated for this run).
    Called before the run directory exists, so a bad file costs nothing."""
    if not config.he_public:
        if config.access_policy:
            raise ConfigError([
                "privacy=he in an authorised deployment needs he-public: create keys with "
                "`fedlearn keys he-generate --out DIR`, give DIR/he.public to the server and DIR/he.secret to each node"
            ])
        return None
    try:
        key = HEKey.load(config.he_public, secret=False)
    except HEKeyError as exc:
        raise ConfigError([f"he-public: {exc}"]) from None
    if key.info.scheme != config.he_scheme:
        raise ConfigError([f"he-public is a {key.info.scheme} context but the run has he-scheme={config.he_scheme}"])
    if config.num_clients > key.info.max_terms:
        raise ConfigError([
            f"he-public was made for sums of at most {key.info.max_terms} clients, the run has num-clients="
            f"{config.num_clients}: generate keys with --max-clients {config.num_clients}"
        ])
    return key


def provision_he(directory: Path, config: RunConfig) -> RunConfig:
    """Simulation: a fresh key pair in the run directory (secret for the simulated clients)."""
    secret, public = generate_pair(directory / "he", config.he_scheme, config.num_clients)
    return config.replace(he_public=str(public), he_secret=str(secret))
