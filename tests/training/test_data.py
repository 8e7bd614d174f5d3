"""Datasets: shapes, dtypes, deterministic disjoint splits, the three CIFAR-10 layouts, cache, errors."""
from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnn_fast.training import data

SHARED = Path(__file__).resolve().parents[3] / "shared"
CIFAR_DIR = SHARED / "data" / "cifar10"
needs_cifar = pytest.mark.skipif(not (CIFAR_DIR / "train.tar.gz").is_file(),
                                 reason=f"CIFAR-10 tarballs not found at {CIFAR_DIR} (CI-only data)")


@pytest.fixture(scope="session")
def cifar_cache(tmp_path_factory) -> Path:
    # The same folder as test_models.py's fixture, so the tarballs are decoded once per session.
    return tmp_path_factory.getbasetemp() / "mnn_fast_cache"


@pytest.fixture(scope="session")
def cifar(cifar_cache):
    return data.load_dataset("cifar10", CIFAR_DIR, cache_dir=cifar_cache)


@pytest.mark.parametrize("name, n, n_test, shape", [("digits", 1797, 539, (1, 8, 8)),
                                                      ("mnist5k", 5000, 1000, (1, 28, 28))])
def test_small_datasets(name, n, n_test, shape):
    s = data.load_dataset(name, seed=0)
    assert s.name == name and s.num_classes == 10 and s.input_shape == shape
    assert s.train_x.shape == (n - n_test, *shape) and s.test_x.shape == (n_test, *shape)
    assert s.train_x.dtype == s.test_x.dtype == torch.float32
    assert s.train_y.dtype == s.test_y.dtype == torch.int64
    assert 0 <= s.train_x.min() and s.train_x.max() <= 1 and s.train_x.max() > 0.9
    assert set(s.train_y.tolist()) == set(s.test_y.tolist()) == set(range(10))


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_splits_are_deterministic_and_depend_on_seed(name):
    a, b, c = (data.load_dataset(name, seed=s) for s in (0, 0, 1))
    for f in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.test_x, c.test_x)


def test_digits_split_is_a_partition_of_the_dataset():
    from sklearn.datasets import load_digits

    d = load_digits()
    x_all = torch.from_numpy(d.data.astype(np.float32) / 16).reshape(-1, 1, 8, 8)
    y_all = torch.from_numpy(d.target)
    tr, te = data.split_indices(y_all, 0.3, seed=3)
    assert set(tr.tolist()).isdisjoint(te.tolist()) and len(tr) + len(te) == len(y_all)
    s = data.load_dataset("digits", seed=3)
    assert torch.equal(s.train_x, x_all[tr]) and torch.equal(s.test_x, x_all[te])
    assert torch.equal(s.test_y, y_all[te])


def test_validation_split():
    y = torch.arange(1000) % 10
    x = torch.arange(1000)  # x holds each sample's index, so the split's indices are visible
    tx, ty, vx, vy = data.validation_split(x, y, 0.1, seed=0)
    assert len(vx) == 100 and torch.equal(torch.bincount(vy), torch.full((10,), 10))
    assert set(tx.tolist()).isdisjoint(vx.tolist()) and len(tx) + len(vx) == 1000
    assert torch.equal(ty, y[tx])
    assert torch.equal(vx, data.validation_split(x, y, 0.1, seed=0)[2])
    assert not torch.equal(vx, data.validation_split(x, y, 0.1, seed=1)[2])
    with pytest.raises(ValueError, match="fraction"):
        data.validation_split(x, y, 1.5)


def test_batches_cover_every_sample_once():
    x, y = torch.arange(10).float().view(10, 1), torch.arange(10)
    got = list(data.batches(x, y, 4, shuffle=True, seed=5))
    assert [len(b[0]) for b in got] == [4, 4, 2]
    order = torch.cat([b[1] for b in got])
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    assert torch.equal(order, torch.cat([b[1] for b in data.batches(x, y, 4, shuffle=True, seed=5)]))
    assert torch.equal(torch.cat([b[0] for b in data.batches(x, y, 3)]), x)


def test_augmentation_is_a_shifted_crop_or_its_mirror():
    x = torch.randn(64, 3, 8, 8)
    out = data.random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, data.random_crop_flip(x, torch.Generator().manual_seed(0), padding=2))
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        crops = [c for dy in range(5) for dx in range(5) for c in
                 (xp[i, :, dy:dy + 8, dx:dx + 8], xp[i, :, dy:dy + 8, dx:dx + 8].flip(2))]
        assert any(torch.equal(out[i], c) for c in crops)
    flips = data.random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    flipped = [torch.equal(flips[i], x[i].flip(2)) for i in range(len(x))]
    assert all(f or torch.equal(flips[i], x[i]) for i, f in enumerate(flipped))
    assert 16 < sum(flipped) < 48
    y = torch.zeros(64, dtype=torch.int64)
    (xb, yb), = data.batches(x, y, 64, augment=True, seed=1)
    assert xb.shape == x.shape and not torch.equal(xb, x)


def _write_tree(root: Path, sizes=None, fmt="PNG"):
    """train/ and test/ with classes b_cls, a_cls, c_cls (sorted: a, b, c); class k's pixels are k*80."""
    sizes = sizes or {}
    for split, n in (("train", 3), ("test", 2)):
        for k, cls in enumerate(["a_cls", "b_cls", "c_cls"]):
            (root / split / cls).mkdir(parents=True)
            for j in range(n):
                size = sizes.get((split, cls, j), (32, 32))
                img = Image.new("RGB", size, (k * 80, k * 80, k * 80))
                img.save(root / split / cls / f"{j}.{fmt.lower()}", fmt)


def test_cifar_image_folder(tmp_path):
    _write_tree(tmp_path)
    s = data.load_dataset("cifar10", tmp_path)
    assert s.train_x.shape == (9, 3, 32, 32) and s.test_x.shape == (6, 3, 32, 32)
    assert s.classes == ("a_cls", "b_cls", "c_cls") and s.num_classes == 3
    assert s.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    mean, std = torch.tensor(data.CIFAR10_MEAN), torch.tensor(data.CIFAR10_STD)
    torch.testing.assert_close(s.test_x[2, :, 5, 5], (80 / 255 - mean) / std)
    # The pretrained ResNets expect ImageNet statistics: the same pixel, the other normalisation.
    imagenet = data.load_dataset("cifar10", tmp_path, normalization="imagenet")
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    torch.testing.assert_close(imagenet.test_x[2, :, 5, 5], (80 / 255 - mean) / std)
    with pytest.raises(ValueError, match="normalization"):
        data.load_dataset("cifar10", tmp_path, normalization="imagenette")


def test_cifar_tarballs_and_cache(tmp_path):
    tree, cache = tmp_path / "tree", tmp_path / "cache"
    _write_tree(tree, fmt="JPEG")
    for split in ("train", "test"):
        with tarfile.open(tmp_path / f"{split}.tar.gz", "w:gz") as tf:
            tf.add(tree / split, arcname=split)
    a = data.load_dataset("cifar10", tmp_path, cache_dir=cache)
    assert a.train_x.shape == (9, 3, 32, 32) and a.classes == ("a_cls", "b_cls", "c_cls")
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".npz")  # no temp file left behind
    b = data.load_dataset("cifar10", tmp_path, cache_dir=cache)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    os.utime(tmp_path / "test.tar.gz", ns=(1, 1))  # a changed tarball must not reuse the old cache
    data.load_dataset("cifar10", tmp_path, cache_dir=cache)
    assert len(os.listdir(cache)) == 2


def _fake_batch(path: Path, n: int, first_label: int):
    x = np.zeros((n, 3072), dtype=np.uint8)
    x[0, :1024] = 255  # image 0: red plane only, in CIFAR's channel-major layout
    blob = pickle.dumps({b"data": x, "labels": [first_label] + [1] * (n - 1)}, protocol=2)
    # The official files were written by numpy 1 under Python 2: numpy.core, not numpy._core.
    path.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def test_cifar_python_batches(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        _fake_batch(d / f"data_batch_{i}", 4, 9)
    _fake_batch(d / "test_batch", 3, 2)
    s = data.load_dataset("cifar10", tmp_path)
    assert s.train_x.shape == (20, 3, 32, 32) and s.test_x.shape == (3, 3, 32, 32)
    assert s.classes == data.CIFAR10_CLASSES and s.test_y.tolist() == [2, 1, 1]
    red = s.test_x[0, :, 3, 7]
    assert red[0] > 1.5 and red[1] < -1.5 and red[2] < -1.5


def test_cifar_python_batch_with_foreign_code_is_refused(tmp_path):
    _fake_batch(tmp_path / "data_batch_1", 2, 0)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        data.load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="name: unknown dataset 'imagenet'"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="path: load_dataset"):
        data.load_dataset("cifar10")
    with pytest.raises(ValueError, match="path: .* is not a directory"):
        data.load_dataset("cifar10", tmp_path / "nope")
    with pytest.raises(ValueError, match="path: .* holds no CIFAR-10 data; expected train.tar.gz"):
        data.load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(torch.zeros(2), torch.zeros(2), 0))


def test_corrupt_inputs(tmp_path):
    (tmp_path / "train.tar.gz").write_bytes(b"not a tarball")
    (tmp_path / "test.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match="path: .*train.tar.gz' is not a readable .tar.gz"):
        data.load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")

    bad = tmp_path / "bad"
    _write_tree(bad)
    (bad / "train" / "b_cls" / "1.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="cannot decode image .*1.png"):
        data.load_dataset("cifar10", bad)

    odd = tmp_path / "odd"
    _write_tree(odd, sizes={("test", "c_cls", 1): (28, 28)})
    with pytest.raises(ValueError, match="is 28x28, expected 32x32"):
        data.load_dataset("cifar10", odd)

    mixed = tmp_path / "mixed"
    _write_tree(mixed)
    (mixed / "test" / "a_cls").rename(mixed / "test" / "z_cls")
    with pytest.raises(ValueError, match="train and test classes differ"):
        data.load_dataset("cifar10", mixed)


@needs_cifar
def test_cifar10_shared_tarballs(cifar, cifar_cache):
    assert cifar.train_x.shape == (50000, 3, 32, 32) and cifar.test_x.shape == (10000, 3, 32, 32)
    assert cifar.train_x.dtype == torch.float32 and cifar.train_y.dtype == torch.int64
    assert cifar.classes == data.CIFAR10_CLASSES and cifar.num_classes == 10
    assert torch.equal(torch.bincount(cifar.train_y), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(cifar.test_y), torch.full((10,), 1000))
    # Normalised with the training set's own statistics: per-channel mean ~0, std ~1.
    torch.testing.assert_close(cifar.train_x.mean((0, 2, 3)), torch.zeros(3), atol=0.01, rtol=0)
    torch.testing.assert_close(cifar.train_x.std((0, 2, 3)), torch.ones(3), atol=0.02, rtol=0)
    assert any(f.endswith(".npz") for f in os.listdir(cifar_cache))
