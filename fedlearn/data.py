"""Dataset registry, offline loaders and federated partitioning.

Every loader returns numpy arrays ``x`` (float32, N x C x H x W, normalised) and ``y``
(int64). Nothing is downloaded implicitly: files come from ``data-dir`` or
``$FEDLEARN_DATA_DIR``; ``fedlearn data download`` is the explicit way to fetch them.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlearn.arraycache import cached_arrays
from fedlearn.errors import DataError
from fedlearn.paths import expand, writable_directory


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    train_size: int  # examples in the train split (or in total when there is no fixed split; 0: per user)
    fixed_test_split: bool
    per_user: bool = False  # each client is one user whose data comes from the seed (no shared pool)

    def approx_train_size(self, test_fraction: float) -> int:
        if self.fixed_test_split:
            return self.train_size
        return int(self.train_size * (1.0 - test_fraction))


SPECS = {
    "digits": DatasetSpec("digits", (1, 8, 8), 10, 1797, False),
    # The digits, each client group seeing them under its own rotation (IFCA's rotated MNIST,
    # Ghosh et al. 2020): a clustered federation whose true clusters are known.
    "rotated-digits": DatasetSpec("rotated-digits", (1, 8, 8), 10, 1797, False),
    "mnist": DatasetSpec("mnist", (1, 28, 28), 10, 60000, True),
    "fashion-mnist": DatasetSpec("fashion-mnist", (1, 28, 28), 10, 60000, True),
    "cifar10": DatasetSpec("cifar10", (3, 32, 32), 10, 50000, True),
    "synthetic32": DatasetSpec("synthetic32", (3, 32, 32), 10, 4000, True),
    # One user per client, any number of them, each user's examples drawn from the seed when asked
    # (Li et al. 2020's Synthetic, with one shared labelling): nothing per client is kept.
    "synthetic-users": DatasetSpec("synthetic-users", (1, 1, 60), 10, 0, True, per_user=True),
}


def spec(name: str) -> DatasetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(SPECS)}") from None


@dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    spec: DatasetSpec
    train: Split
    test: Split


# ---------------------------------------------------------------------------------------
# Files: where they live, what they must hash to, where users can get them.

IDX_FILES = {
    "train-images": "train-images-idx3-ubyte.gz",
    "train-labels": "train-labels-idx1-ubyte.gz",
    "test-images": "t10k-images-idx3-ubyte.gz",
    "test-labels": "t10k-labels-idx1-ubyte.gz",
}
# MD5 of the .gz file and/or of its uncompressed bytes; a file passes if either matches.
# (A re-compressed MNIST file differs in its gzip header, so the raw MD5 is the one to trust.)
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", None),
        "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe", None),
        "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79", None),
        "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310", None),
    },
}
DOWNLOAD_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
}
CIFAR10_TAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_RECORD = 1 + 3 * 32 * 32

NORMALISATION = {  # per-channel mean and std of the training set, after scaling to [0, 1]
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    chosen = data_dir or os.environ.get("FEDLEARN_DATA_DIR")
    if not chosen:
        raise DataError(
            "no data directory given: set data-dir=PATH in the run config or export "
            "FEDLEARN_DATA_DIR=PATH (get the files with `fedlearn data download NAME --data-dir PATH`)"
        )
    path = expand(chosen, "data directory")
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        source = "data-dir" if data_dir else "FEDLEARN_DATA_DIR"
        raise DataError(f"data directory {path} (from {source}) {what}: point {source} at the directory holding the datasets")
    return path


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _read_verified_idx(path: Path, dataset: str) -> bytes:
    """Return the uncompressed bytes of an IDX gzip file after checking its checksum."""
    if not path.is_file():
        raise DataError(
            f"missing file {path}; get it with `fedlearn data download {dataset} --data-dir "
            f"{path.parent.parent}`"
        )
    packed = path.read_bytes()
    try:
        raw = gzip.decompress(packed)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is not a valid gzip file ({exc}); delete it and download again") from None
    gz_md5, raw_md5 = CHECKSUMS[dataset][path.name]
    if _md5(packed) != gz_md5 and (raw_md5 is None or _md5(raw) != raw_md5):
        raise DataError(f"{path} fails its MD5 checksum (corrupt or a different file); download it again")
    return raw


def parse_idx(raw: bytes, *, source: str = "IDX data") -> np.ndarray:
    """Decode IDX (big-endian header, unsigned bytes) into an array."""
    if len(raw) < 8:
        raise DataError(f"{source}: too short to be IDX")
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte elements
        raise DataError(f"{source}: bad IDX magic number {magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{source}: {len(raw)} bytes, the header {dims} implies {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


INPUT_SCALINGS = ("standard", "unit")


def _normalise(x_uint8: np.ndarray, dataset: str, scaling: str = "standard") -> np.ndarray:
    """Pixels to float32: ``standard`` to mean 0 and std 1 per channel (faster SGD), ``unit`` to
    [0, 1] only (what the early federated papers' TensorFlow pipelines fed their models)."""
    x = x_uint8.astype(np.float32) / 255.0
    if scaling == "unit":
        return x
    mean, std = NORMALISATION[dataset]
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - mean_a) / std_a


def load_idx_dataset(name: str, data_dir: str | None, scaling: str = "standard") -> Dataset:
    root = resolve_data_dir(data_dir) / name
    arrays = {}
    for role, filename in IDX_FILES.items():
        path = root / filename
        arrays[role] = parse_idx(_read_verified_idx(path, name), source=str(path))
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}-images"], arrays[f"{split}-labels"]
        if len(images) != len(labels):
            raise DataError(f"{root}: {split} has {len(images)} images but {len(labels)} labels")
        splits[split] = Split(_normalise(images[:, None, :, :], name, scaling), labels.astype(np.int64))
    return Dataset(SPECS[name], splits["train"], splits["test"])


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(
            f"missing file {path}; get CIFAR-10 (binary version) with "
            f"`fedlearn data download cifar10 --data-dir {path.parent.parent}`"
        )
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD:
        raise DataError(f"{path}: size {raw.size} is not a multiple of the {CIFAR10_RECORD}-byte CIFAR-10 record")
    records = raw.reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label {labels.max()} out of range 0-9; is this the binary version?")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | None, scaling: str = "standard") -> Dataset:
    root = resolve_data_dir(data_dir) / CIFAR10_DIR
    train_parts = [_read_cifar_batch(root / f"data_batch_{i}.bin") for i in range(1, 6)]
    x_test, y_test = _read_cifar_batch(root / "test_batch.bin")
    x_train = np.concatenate([p[0] for p in train_parts])
    y_train = np.concatenate([p[1] for p in train_parts])
    return Dataset(
        SPECS["cifar10"],
        Split(_normalise(x_train, "cifar10", scaling), y_train),
        Split(_normalise(x_test, "cifar10", scaling), y_test),
    )


def load_digits(test_fraction: float, seed: int, name: str = "digits") -> Dataset:
    """scikit-learn's digits, split stratified; kept in the array cache, as importing
    scikit-learn costs a fresh client process more than the rest of its start."""

    def split() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits as sk_digits
        from sklearn.model_selection import train_test_split

        bunch = sk_digits()
        x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
        y = bunch.target.astype(np.int64)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
        return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}

    arrays = cached_arrays("digits", {"test_fraction": test_fraction, "seed": seed}, split,
                           names=("x_train", "y_train", "x_test", "y_test"), libraries=("scikit-learn", "numpy"))
    return Dataset(SPECS[name], Split(arrays["x_train"], arrays["y_train"]), Split(arrays["x_test"], arrays["y_test"]))


def make_synthetic32(train_size: int = 4000, test_size: int = 1000, seed: int = 0) -> Dataset:
    """A 10-class 32x32x3 set: smooth class prototypes plus noise and random shifts.

    Fixed seed, so every client and the server see the same data. Learnable by a CNN in a
    few epochs, but not linearly trivial because of the shifts.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(10, 3, 8, 8)).astype(np.float32)
    prototypes = coarse.repeat(4, axis=2).repeat(4, axis=3)  # 10 x 3 x 32 x 32, blocky patterns

    def sample(n: int) -> Split:
        y = rng.integers(0, 10, size=n)
        x = prototypes[y].copy()
        shifts = rng.integers(-3, 4, size=(n, 2))
        for i, (dy, dx) in enumerate(shifts):
            x[i] = np.roll(x[i], (int(dy), int(dx)), axis=(1, 2))
        x += rng.normal(scale=1.0, size=x.shape).astype(np.float32)
        return Split(x.astype(np.float32), y.astype(np.int64))

    return Dataset(SPECS["synthetic32"], sample(train_size), sample(test_size))


# ---------------------------------------------------------------------------------------
# synthetic-users: per-user data from the seed, for simulations of 100,000 clients and more.

USER_FEATURES = 60
INFORMATIVE = 10  # features the labels depend on
TEST_USERS = 500  # users no client is: the server's test split (a model for new users)
_TEST_USER_BASE = 1 << 40


@functools.lru_cache(maxsize=4)
def _labelling(seed: int) -> np.ndarray:
    """The one linear map (10 x 60) whose largest output labels every user's examples."""
    rng = np.random.default_rng([seed, 0x5E7])
    weights = np.zeros((10, USER_FEATURES))
    weights[:, :INFORMATIVE] = rng.normal(size=(10, INFORMATIVE))  # the rest of the features are noise
    return weights


def synthetic_user(seed: int, user: int) -> Split:
    """User ``user``'s examples: unit-variance features around a mean of the user's own (a
    covariate shift between users, as in Li et al. 2020's Synthetic), labelled by the shared
    model; between 8 and 200 examples, a log-normal count (median 30), as LEAF's users vary."""
    rng = np.random.default_rng([seed, 0x5E7, user])
    count = int(np.clip(rng.lognormal(3.4, 0.6), 8, 200))
    mean = rng.normal(0.0, 0.5, size=USER_FEATURES)
    x = (mean + rng.normal(size=(count, USER_FEATURES))).astype(np.float32)
    y = np.argmax(x @ _labelling(seed).T, axis=1).astype(np.int64)
    return Split(x.reshape(count, 1, 1, USER_FEATURES), y)


@functools.lru_cache(maxsize=2)
def _synthetic_users_test(seed: int) -> Split:
    users = [synthetic_user(seed, _TEST_USER_BASE + i) for i in range(TEST_USERS)]
    return Split(np.concatenate([u.x for u in users]), np.concatenate([u.y for u in users]))


@functools.lru_cache(maxsize=4)
def load(name: str, data_dir: str = "", test_fraction: float = 0.2, seed: int = 42, scaling: str = "standard") -> Dataset:
    """Load a registered dataset (cached per process, so simulated clients share it).
    ``scaling`` (INPUT_SCALINGS) applies to the image files (NORMALISATION's datasets)."""
    if spec(name).per_user:
        raise DataError(f"{name} has no pooled training set: each client is one user (data.client_split)")
    if name in ("digits", "rotated-digits"):  # rotated-digits turns each client's share (client_split)
        return load_digits(test_fraction, seed, name)
    if name == "synthetic32":
        return make_synthetic32()
    if name == "cifar10":
        return load_cifar10(data_dir or None, scaling)
    return load_idx_dataset(name, data_dir or None, scaling)


def loaded(config) -> Dataset:
    """The pooled dataset a run's config names, loaded as the config says."""
    return load(config.dataset, config.data_dir, config.test_fraction, config.seed, config.input_scaling)


# ---------------------------------------------------------------------------------------
# Partitioning (flwr-datasets partitioners over the label column).


@functools.lru_cache(maxsize=8)
def _partitions_cached(
    labels_key: bytes, num_partitions: int, partitioner: str, alpha: float, shards: int, seed: int
) -> tuple[np.ndarray, ...]:
    """In memory for this process, on disk for the next (flwr-datasets' import is most of a fresh
    client's start)."""
    key = {"num_partitions": num_partitions, "partitioner": partitioner, "alpha": alpha, "shards": shards, "seed": seed}
    names = tuple(f"p{i}" for i in range(num_partitions))
    arrays = cached_arrays(
        "partitions", key,
        lambda: dict(zip(names, _partitions(labels_key, num_partitions, partitioner, alpha, shards, seed))),
        names=names, data=labels_key, libraries=("flwr-datasets", "datasets", "numpy"),
    )
    return tuple(arrays[name] for name in names)


def _partitions(
    labels_key: bytes, num_partitions: int, partitioner: str, alpha: float, shards: int, seed: int
) -> tuple[np.ndarray, ...]:
    from datasets import Dataset as HFDataset
    from datasets.utils.logging import disable_progress_bar
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    disable_progress_bar()
    labels = np.frombuffer(labels_key, dtype=np.int64)
    table = HFDataset.from_dict({"label": labels, "index": np.arange(len(labels))})
    if partitioner == "iid":
        part = IidPartitioner(num_partitions)
        table = table.shuffle(seed=seed)
    elif partitioner == "dirichlet":
        min_size = max(1, min(10, len(labels) // (4 * num_partitions)))
        part = DirichletPartitioner(
            num_partitions, "label", alpha, min_partition_size=min_size, self_balancing=False, seed=seed
        )
    elif partitioner == "shards":
        part = ShardPartitioner(num_partitions, "label", num_shards_per_partition=shards, seed=seed)
    else:
        raise ValueError(f"unknown partitioner {partitioner!r}")
    part.dataset = table
    return tuple(np.asarray(part.load_partition(i)["index"], dtype=np.int64) for i in range(num_partitions))


def partition(
    labels: np.ndarray, num_partitions: int, partitioner: str, *, alpha: float = 0.5, shards: int = 2, seed: int = 42
) -> list[np.ndarray]:
    """Indices of each client's examples; deterministic for a given seed."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    try:
        with warnings.catch_warnings():  # flwr-datasets warns at every Dirichlet retry; we report failure
            warnings.simplefilter("ignore", UserWarning)
            return list(_partitions_cached(labels.tobytes(), num_partitions, partitioner, alpha, shards, seed))
    except ValueError as exc:  # flwr-datasets' own words, e.g. Dirichlet giving up on tiny partitions
        raise DataError(
            f"cannot split {len(labels)} examples into {num_partitions} partitions with "
            f"partitioner={partitioner}: {exc}; use fewer clients"
            + (" or a larger dirichlet-alpha" if partitioner == "dirichlet" else "")
        ) from None


# ---------------------------------------------------------------------------------------
# Rotations (rotated-digits): client group g sees every image turned by g * 360/k degrees.


def rotation_group(config, partition_id: int) -> int:
    """The rotation (the true cluster) of a client: partitions take the k rotations in turn."""
    return partition_id % config.rotation_count()


def rotate(x: np.ndarray, group: int, groups: int) -> np.ndarray:
    """Images ``x`` (N x C x H x W) turned counter-clockwise by group * 360/groups degrees; exact
    for multiples of 90 degrees, bilinear otherwise."""
    angle = 360.0 * group / groups
    if angle % 90 == 0:
        return np.ascontiguousarray(np.rot90(x, int(angle // 90) % 4, axes=(2, 3)))
    from scipy.ndimage import rotate as nd_rotate

    return nd_rotate(x, angle, axes=(3, 2), reshape=False, order=1, mode="constant").astype(np.float32)


def _client_view(config, partition_id: int, split: Split) -> Split:
    """A client's examples as that client sees them (rotated under rotated-digits)."""
    if config.dataset != "rotated-digits":
        return split
    return Split(rotate(split.x, rotation_group(config, partition_id), config.rotation_count()), split.y)


def test_split(config) -> Split:
    """The server's test split. Under rotated-digits, example i is turned as rotation group
    i mod k would see it, so every rotation is tested equally."""
    if spec(config.dataset).per_user:
        return _synthetic_users_test(config.seed)
    test = loaded(config).test
    if config.dataset != "rotated-digits":
        return test
    k = config.rotation_count()
    x = test.x.copy()
    for group in range(k):
        x[group::k] = rotate(test.x[group::k], group, k)
    return Split(x, test.y)


def _public_and_private(config) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the public set (fedmd: public-size examples, a seeded draw from the train split)
    and of the rest, which the clients partition among themselves. No public set: all private."""
    size = len(loaded(config).train)
    public = config.public_size_count()
    if not public:
        return np.arange(0), np.arange(size)
    order = np.random.default_rng([config.seed, 0xFED]).permutation(size)
    return np.sort(order[:public]), np.sort(order[public:])


def public_split(config) -> Split:
    """The public set FedMD's clients describe to each other (its labels are never used)."""
    train = loaded(config).train
    indices = _public_and_private(config)[0]
    return Split(train.x[indices], train.y[indices])


def _partition_of(config, partition_id: int, num_partitions: int) -> np.ndarray:
    """Indices (into the train split) of one client's whole partition."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    labels = loaded(config).train.y
    private = _public_and_private(config)[1]
    return private[partition(
        labels[private], num_partitions, config.partitioner,
        alpha=config.dirichlet_alpha, shards=config.shards_per_client, seed=config.seed,
    )[partition_id]]


def _examples(config, partition_id: int, indices: np.ndarray) -> Split:
    train = loaded(config).train
    return _client_view(config, partition_id, Split(train.x[indices], train.y[indices]))


def client_split(config, partition_id: int, num_partitions: int) -> Split:
    """The training examples of one client under a run config."""
    if spec(config.dataset).per_user:
        return _user_part(config, partition_id, num_partitions, 0)
    indices = _partition_of(config, partition_id, num_partitions)
    return _examples(config, partition_id, _local_holdout(config, partition_id, indices)[0])


def _user_part(config, partition_id: int, num_partitions: int, part: int) -> Split:
    """A per-user client's training (0) or held-out test (1) examples."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    user = synthetic_user(config.seed, partition_id)
    indices = _local_holdout(config, partition_id, np.arange(len(user)))[part]
    return Split(user.x[indices], user.y[indices])


def _local_holdout(config, partition_id: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of a client's partition: local-test-fraction of it, chosen by a seeded
    shuffle, is its own test set, drawn from the same skewed distribution as its training data."""
    if not config.local_test_fraction:
        return indices, indices[:0]
    order = np.random.default_rng([config.seed, partition_id]).permutation(len(indices))
    cut = int(round(len(indices) * config.local_test_fraction))
    return np.sort(indices[order[cut:]]), np.sort(indices[order[:cut]])


def client_test_split(config, partition_id: int, num_partitions: int) -> Split:
    """One client's test data, for federated evaluation: a seeded, near-equal IID slice of the test
    split (the example-weighted mean of all slices' accuracies is the test accuracy), or with
    local-test-fraction the held-out part of the client's own partition."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    if spec(config.dataset).per_user:  # a user's own held-out examples, or the test users' slice
        if config.local_test_fraction:
            return _user_part(config, partition_id, num_partitions, 1)
        test = _synthetic_users_test(config.seed)
        indices = np.arange(partition_id, len(test), num_partitions)
        return Split(test.x[indices], test.y[indices])
    if config.local_test_fraction:
        indices = _partition_of(config, partition_id, num_partitions)
        return _examples(config, partition_id, _local_holdout(config, partition_id, indices)[1])
    test = loaded(config).test
    order = np.random.default_rng(config.seed).permutation(len(test))
    indices = np.sort(np.array_split(order, num_partitions)[partition_id])
    return _client_view(config, partition_id, Split(test.x[indices], test.y[indices]))


# ---------------------------------------------------------------------------------------
# Explicit download for users with a network (never called implicitly).


def download(name: str, data_dir: str | os.PathLike, base_url: str | None = None) -> Path:
    """Fetch a dataset's files into ``data_dir/<layout>`` and verify them. Files arrive in a
    temporary directory and move into place verified, so a failed download (no network, a bad
    checksum) leaves ``data_dir`` as it was."""
    if name not in CHECKSUMS and name != "cifar10":
        raise DataError(f"{name!r} needs no download (available for download: {', '.join(DOWNLOAD_URLS)})")
    root = writable_directory(data_dir, "--data-dir")
    created = [p for p in (root, *root.parents) if not p.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            return _download_into(name, root, Path(tmp), base_url)
    except BaseException:
        for directory in created:  # deepest first: only what this call made, and only if still empty
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _download_into(name: str, root: Path, tmp: Path, base_url: str | None) -> Path:
    if name == "cifar10":
        archive = tmp / "cifar-10-binary.tar.gz"
        _fetch(base_url or DOWNLOAD_URLS["cifar10"], archive)
        if _md5(archive.read_bytes()) != CIFAR10_TAR_MD5:
            raise DataError("the CIFAR-10 archive fails its MD5 checksum; try again later")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (root / CIFAR10_DIR).mkdir(exist_ok=True)
        for extracted in (tmp / CIFAR10_DIR).iterdir():
            extracted.replace(root / CIFAR10_DIR / extracted.name)
        return root / CIFAR10_DIR
    target = root / name
    fetched = []
    for filename in IDX_FILES.values():
        path = target / filename
        if path.is_file():
            try:
                _read_verified_idx(path, name)
                continue
            except DataError:
                pass
        _fetch(f"{base_url or DOWNLOAD_URLS[name]}{filename}", tmp / filename)
        _read_verified_idx(tmp / filename, name)
        fetched.append(filename)
    target.mkdir(exist_ok=True)
    for filename in fetched:
        (tmp / filename).replace(target / filename)
    return target


def _fetch(url: str, path: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"could not download {url} ({reason}): check the network connection, or copy the files "
                        "there by hand (docs/data-and-models.md)") from None
