"""Your own data: an image folder or arrays (an ``.npz`` or tensors), and the fingerprint a run keeps.

``load_image_folder(DIR)``: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``, classes = sorted folder
names, grayscale kept as one channel, normalised by the training split's own per-channel statistics.
``load_arrays(FILE.npz)`` / ``splits_from_arrays(...)``: ``x_*`` as ``[N, C, H, W]`` or ``[N, D]``,
``y_*`` integer labels in ``[0, C)``, used as given. ``fingerprint(splits)``: sha256 of the data.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data import IMAGE_SUFFIXES, Splits, decode_images

__all__ = ["load_image_folder", "load_arrays", "splits_from_arrays", "fingerprint", "read_npz", "ARRAY_KEYS"]

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


_SPLIT_TENSORS = ("train_x", "train_y", "test_x", "test_y")


def fingerprint(splits: Splits) -> str:
    """Hex sha256 of ``splits``' four tensors (dtype, shape and bytes) and its class count: the same
    data gives the same fingerprint wherever it was read from, other data another.

    A command checks the same splits several times (read, train, load): the digest is kept on the
    object and reused while its four tensors are the same objects, unmodified (torch bumps a tensor's
    version on every in-place write), so each change is seen and nothing is hashed twice.
    """
    tensors = [getattr(splits, name) for name in _SPLIT_TENSORS]
    key = (splits.num_classes, *((id(t), t._version) for t in tensors))
    kept = splits.__dict__.get("_fingerprint")
    if kept is not None and kept[0] == key:
        return kept[1]
    h = hashlib.sha256(f"mnn_fast.data/1 classes={splits.num_classes}".encode())
    for name, t in zip(_SPLIT_TENSORS, tensors):
        t = t.detach().cpu().contiguous()
        h.update(f"|{name} {t.dtype} {tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    splits.__dict__["_fingerprint"] = (key, h.hexdigest())
    return h.hexdigest()


def splits_from_arrays(x_train, y_train, x_test, y_test, *, classes=None, name: str = "arrays",
                       source: dict | None = None) -> Splits:
    """:class:`Splits` of arrays or tensors, used as given (converted to float32 inputs, int64 labels).

    ``x_*``: ``[N, C, H, W]`` images or ``[N, D]`` features, the same per-sample shape in both parts;
    ``y_*``: ``[N]`` integer labels in ``[0, C)``, where ``C`` is ``len(classes)`` if given, else the
    largest label + 1, and every class has training samples. ``ValueError`` naming the array otherwise.
    """
    xs, ys = {}, {}
    for key, value in (("x_train", x_train), ("x_test", x_test)):
        x = _as_tensor(key, value)
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"{key}: expected real numbers, got {x.dtype}")
        if x.dim() not in (2, 4):
            raise ValueError(f"{key}: expected [N, C, H, W] images or [N, D] features, got shape {tuple(x.shape)}"
                             + ("; add the channel axis, e.g. x[:, None]" if x.dim() == 3 else ""))
        xs[key] = x.to(torch.float32).contiguous()
        if not torch.isfinite(xs[key]).all():
            raise ValueError(f"{key}: holds NaN or infinite values")
    if xs["x_train"].shape[1:] != xs["x_test"].shape[1:]:
        raise ValueError(f"x_test: samples of shape {tuple(xs['x_test'].shape[1:])}, expected "
                         f"{tuple(xs['x_train'].shape[1:])} like x_train")
    for key, value, x in (("y_train", y_train, xs["x_train"]), ("y_test", y_test, xs["x_test"])):
        y = _as_tensor(key, value)
        if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
            raise ValueError(f"{key}: expected integer labels, got {y.dtype}")
        if y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"{key}: expected [{len(x)}] labels (one per sample of x_{key[2:]}), got shape {tuple(y.shape)}")
        ys[key] = y.to(torch.int64).contiguous()
    if len(ys["y_train"]) == 0:
        raise ValueError("x_train: no training samples")
    labels = torch.cat([ys["y_train"], ys["y_test"]])
    if int(labels.min()) < 0:
        raise ValueError(f"y: labels must be >= 0, got {int(labels.min())}")
    if classes is not None:
        classes = tuple(str(c) for c in classes)
        num_classes = len(classes)
        if int(labels.max()) >= num_classes:
            raise ValueError(f"y: label {int(labels.max())} out of range for {num_classes} classes")
    else:
        num_classes = int(labels.max()) + 1
        classes = tuple(str(k) for k in range(num_classes))
    empty = [classes[k] for k in range(num_classes) if not bool((ys["y_train"] == k).any())]
    if empty:
        raise ValueError(f"y_train: no training samples of class(es) {empty[:10]}; every class of [0, {num_classes}) "
                         "needs some")
    return Splits(xs["x_train"], ys["y_train"], xs["x_test"], ys["y_test"], num_classes,
                  tuple(xs["x_train"].shape[1:]), name, classes, source=source)


def read_npz(path: Path, argument: str, keys) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` at ``path`` that ``keys(names in the file)`` picks, read without
    unpickling anything. Every failure is one ``ValueError`` that starts with ``argument:`` (the
    option or parameter the path came from); ``keys`` raises its own the same way."""
    if not zipfile.is_zipfile(path):  # np.load would take any other file for a pickle and refuse that
        raise ValueError(f"{argument}: {str(path)!r} is not a readable .npz (not a zip archive of arrays)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys(list(z.files))}
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{argument}: {str(path)!r} is not a readable .npz ({exc})") from None
    except ValueError as exc:
        if str(exc).startswith(f"{argument}:"):
            raise
        raise ValueError(f"{argument}: {str(path)!r}: {exc}") from None  # e.g. an object array (pickled)


def load_arrays(path: str | os.PathLike) -> Splits:
    """The :class:`Splits` of an ``.npz`` holding ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and,
    optionally, ``classes``: the class names), read without unpickling anything."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data_path: {str(path)!r} is not a file; expected an .npz with keys {', '.join(ARRAY_KEYS)}")

    def keys(files: list[str]) -> list[str]:
        missing = [k for k in ARRAY_KEYS if k not in files]
        if missing:
            raise ValueError(f"data_path: {str(path)!r} lacks key(s) {missing}; expected {', '.join(ARRAY_KEYS)}")
        return list(ARRAY_KEYS) + (["classes"] if "classes" in files else [])

    arrays = read_npz(path, "data_path", keys)
    classes = [str(c) for c in arrays.pop("classes")] if "classes" in arrays else None
    return splits_from_arrays(**arrays, classes=classes, name=path.stem,
                              source={"dataset": "arrays", "data_path": str(path)})


def load_image_folder(path: str | os.PathLike) -> Splits:
    """The :class:`Splits` of ``path/train/<class>/<image>`` and ``path/test/<class>/<image>``.

    Classes are the sorted folder names (the same in both parts, each with images). All images share
    one size; grayscale folders stay one channel (every pixel of every image gray), else every image is RGB. Pixels in
    ``[0, 1]`` are normalised per channel by the training images' mean and std, recorded in
    ``Splits.normalization``.
    """
    from tqdm import tqdm

    root = Path(path)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise ValueError(f"data_path: {str(root)!r} needs train/<class>/ and test/<class>/ image folders")
    parts, classes = {}, None
    for part in ("train", "test"):
        names = sorted(d.name for d in (root / part).iterdir() if d.is_dir())
        if classes is not None and names != classes:
            raise ValueError(f"data_path: classes of train/ and test/ differ in {str(root)!r}: {classes} vs {names}")
        classes = names
        items = []
        for c in names:
            files = [f for f in sorted((root / part / c).iterdir()) if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)]
            if part == "train" and not files:
                raise ValueError(f"data_path: class folder {str(root / part / c)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            items += [(str(f), c, lambda f=f: f) for f in files]
        if not items:
            raise ValueError(f"data_path: {str(root / part)!r} holds no <class>/<image> files")
        parts[part] = items
    (xtr, ytr, ctr), (xte, yte, _) = (decode_images(parts[p], f"decoding {p}/", tqdm) for p in ("train", "test"))
    if _all_gray(xtr) and _all_gray(xte):
        xtr, xte = xtr[..., 0], xte[..., 0]  # PIL's grayscale-to-RGB copies the value: nothing is lost
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"data_path: test images are {xte.shape[2]}x{xte.shape[1]}, train images {xtr.shape[2]}x{xtr.shape[1]}")
    # decode numbers the classes present in a part; both parts use the train folders' order.
    index = {c: k for k, c in enumerate(classes)}
    ytr = np.array([index[c] for c in ctr], dtype=np.int64)[ytr]
    yte = np.array([index[c] for c in sorted({c for _, c, _ in parts["test"]})], dtype=np.int64)[yte]
    xtr_t, xte_t = (_channels_first(x) for x in (xtr, xte))
    mean = xtr_t.mean(dim=(0, 2, 3), dtype=torch.float64)
    std = xtr_t.std(dim=(0, 2, 3)).to(torch.float64).clamp_min(1e-6)
    norm = lambda x: ((x - mean.float().view(1, -1, 1, 1)) / std.float().view(1, -1, 1, 1)).contiguous()  # noqa: E731
    splits = splits_from_arrays(norm(xtr_t), torch.from_numpy(ytr), norm(xte_t), torch.from_numpy(yte), classes=classes,
                                name=root.name, source={"dataset": "imagefolder", "data_path": str(root)})
    splits.normalization = {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std],
                            "of": "the training images' pixels in [0, 1]"}
    return splits


def _as_tensor(key: str, value) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"{key}: expected a numeric array, got dtype object")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{key}: expected a numpy array or a torch Tensor, got {type(value).__name__}")


def _all_gray(x: np.ndarray) -> bool:
    """True when every pixel of ``uint8 [N, H, W, 3]`` has equal channels (grayscale images)."""
    return bool((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all())


def _channels_first(x: np.ndarray) -> Tensor:
    """``uint8 [N, H, W(, 3)]`` -> ``Tensor[N, C, H, W] float32`` in ``[0, 1]``."""
    t = torch.from_numpy(x).to(torch.float32).div_(255.0)
    return (t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)).contiguous()
