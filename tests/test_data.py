import gzip
import hashlib
import socket

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlearn import data
from fedlearn.config import RunConfig
from fedlearn.errors import DataError, PathError


def test_digits_split_is_stratified_and_deterministic():
    a = data.load_digits(0.2, seed=1)
    b = data.load_digits(0.2, seed=1)
    c = data.load_digits(0.2, seed=2)
    assert a.train.x.shape[1:] == (1, 8, 8) and a.train.x.dtype == np.float32
    assert len(a.train) + len(a.test) == 1797
    assert np.array_equal(a.test.y, b.test.y) and not np.array_equal(a.test.y, c.test.y)
    assert set(np.unique(a.test.y)) == set(range(10))
    assert 0.0 <= a.train.x.min() and a.train.x.max() <= 1.0


def test_synthetic32_shape_and_classes():
    ds = data.make_synthetic32(train_size=200, test_size=50)
    assert ds.train.x.shape == (200, 3, 32, 32) and ds.test.x.shape == (50, 3, 32, 32)
    assert ds.train.y.max() < 10
    again = data.make_synthetic32(train_size=200, test_size=50)
    assert np.array_equal(ds.train.x, again.train.x)


def _check_partition(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "partitions overlap"
    assert set(joined) <= set(range(n))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(20, 400), clients=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_iid_partitions_cover_everything_disjointly(n, clients, seed):
    labels = np.arange(n) % 10
    parts = data.partition(labels, clients, "iid", seed=seed)
    _check_partition(parts, n)
    assert sum(len(p) for p in parts) == n
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_partitions_are_deterministic_under_seed():
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    for kind in ("iid", "dirichlet", "shards"):
        a = data.partition(labels, 10, kind, alpha=0.3, seed=5)
        b = data.partition(labels.copy(), 10, kind, alpha=0.3, seed=5)
        c = data.partition(labels, 10, kind, alpha=0.3, seed=6)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c))
        _check_partition(a, 1000)


def test_shards_give_few_labels_per_client_and_dirichlet_skews():
    labels = np.repeat(np.arange(10), 100)
    shards = data.partition(labels, 10, "shards", shards=2, seed=0)
    assert max(len(np.unique(labels[p])) for p in shards) <= 2
    skewed = data.partition(labels, 10, "dirichlet", alpha=0.1, seed=0)
    uniform = data.partition(labels, 10, "iid", seed=0)
    entropy = lambda parts: np.mean([len(np.unique(labels[p])) for p in parts])  # noqa: E731
    assert entropy(skewed) < entropy(uniform)


def test_client_split_uses_config():
    config = RunConfig.from_flat({"num-clients": 5})
    splits = [data.client_split(config, i, 5) for i in range(5)]
    assert sum(len(s) for s in splits) == len(data.load("digits", "", 0.2, 42).train)
    with pytest.raises(DataError, match="outside 0..4"):
        data.client_split(config, 5, 5)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.integers(0, 2**31 - 1))
def test_idx_roundtrip(shape, seed):
    array = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    assert np.array_equal(data.parse_idx(_idx(array)), array)


def test_idx_rejects_bad_magic_and_truncation():
    good = _idx(np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="magic"):
        data.parse_idx(b"\x00\x00\x09\x02" + good[4:])
    with pytest.raises(DataError, match="implies"):
        data.parse_idx(good[:-1])


def test_missing_data_dir_is_explained(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDLEARN_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="FEDLEARN_DATA_DIR"):
        data.resolve_data_dir("")
    with pytest.raises(DataError, match="does not exist"):
        data.resolve_data_dir(tmp_path / "nope")
    with pytest.raises(DataError, match="missing file .*train-images.*fedlearn data download mnist"):
        data.load_idx_dataset("mnist", str(tmp_path))


def test_mnist_loads_and_verifies(mnist_data_dir):
    ds = data.load_idx_dataset("mnist", str(mnist_data_dir))
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert abs(float(ds.train.x.mean())) < 0.01 and abs(float(ds.train.x.std()) - 1.0) < 0.01
    assert np.bincount(ds.test.y).tolist()[:2] == [980, 1135]
    unit = data.load_idx_dataset("mnist", str(mnist_data_dir), scaling="unit")  # McMahan-era pixels in [0, 1]
    assert float(unit.train.x.min()) == 0.0 and float(unit.train.x.max()) == 1.0
    assert np.allclose(unit.train.x[:100], ds.train.x[:100] * 0.3081 + 0.1307, atol=1e-5)


def test_corrupt_mnist_file_is_named(mnist_data_dir, tmp_path):
    target = tmp_path / "mnist"
    target.mkdir()
    for name in data.IDX_FILES.values():
        (target / name).write_bytes((mnist_data_dir / "mnist" / name).read_bytes())
    labels = target / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[100] ^= 1
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz fails its MD5"):
        data.load_idx_dataset("mnist", str(tmp_path))
    labels.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a valid gzip"):
        data.load_idx_dataset("mnist", str(tmp_path))


def test_download_fetches_and_verifies(mnist_data_dir, tmp_path):
    # The real download path, pointed at a local mirror through a file:// URL.
    target = data.download("mnist", tmp_path, base_url=(mnist_data_dir / "mnist").as_uri() + "/")
    for name in data.IDX_FILES.values():
        assert hashlib.sha256((target / name).read_bytes()).digest() == hashlib.sha256(
            (mnist_data_dir / "mnist" / name).read_bytes()
        ).digest()
    with pytest.raises(DataError, match="needs no download"):
        data.download("digits", tmp_path)


def test_a_failed_download_says_why_and_leaves_the_data_directory_as_it_was(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: as without a network
    fresh = tmp_path / "new" / "data"
    with pytest.raises(DataError, match="could not download http://127.0.0.1.*check the network"):
        data.download("mnist", fresh, base_url=f"http://127.0.0.1:{port}/")
    assert not (tmp_path / "new").exists()  # no empty dataset folder left behind

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="could not download file:"):
        data.download("fashion-mnist", existing, base_url=(tmp_path / "missing").as_uri() + "/")
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(PathError, match="is a file, not a directory"):
        data.download("mnist", a_file)


def _write_cifar_batch(path, n, rng):
    records = rng.integers(0, 256, size=(n, data.CIFAR10_RECORD), dtype=np.uint8)
    records[:, 0] = rng.integers(0, 10, size=n)
    records.tofile(path)
    return records


def test_cifar10_binary_loader(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / data.CIFAR10_DIR
    root.mkdir()
    batches = [_write_cifar_batch(root / f"data_batch_{i}.bin", 7, rng) for i in range(1, 6)]
    test = _write_cifar_batch(root / "test_batch.bin", 5, rng)
    ds = data.load_cifar10(str(tmp_path))
    assert ds.train.x.shape == (35, 3, 32, 32) and ds.test.x.shape == (5, 3, 32, 32)
    assert ds.train.y.tolist() == np.concatenate([b[:, 0] for b in batches]).tolist()
    assert ds.test.y.tolist() == test[:, 0].tolist()
    (root / "test_batch.bin").write_bytes(b"\x01" * 100)
    with pytest.raises(DataError, match="not a multiple"):
        data.load_cifar10(str(tmp_path))
    (root / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match="missing file .*data_batch_3.bin"):
        data.load_cifar10(str(tmp_path))


def test_impossible_dirichlet_split_is_explained():
    labels = np.repeat(np.arange(10), 20)
    with pytest.raises(DataError, match="cannot split 200 examples into 100 partitions.*larger dirichlet-alpha"):
        data.partition(labels, 100, "dirichlet", alpha=0.01, seed=0)
