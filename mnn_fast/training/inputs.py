"""The samples a trained run predicts on: its own test split, an ``.npz``, or a folder of images.

Each is checked against the input shape the run recorded (``RUN/data.json``). Images are decoded to
``[0, 1]``, kept to one channel where the run takes one (grayscale images), and normalised with the
mean and std the run recorded; arrays are used as given, as training uses them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data import IMAGE_SUFFIXES, decode_images
from .datarecord import read_data_record
from .owndata import read_npz
from .pipeline import open_trained_run, run_data

__all__ = ["load_inputs", "DATA_NEEDS"]

DATA_NEEDS = ("an .npz with x (or x_test, as train's arrays data holds it), or an image folder (images in "
              "DIR/test/<class>/, else in DIR/<class>/ and DIR)")


def load_inputs(run_dir, data=None, cache_dir=None) -> Tensor:
    """``Tensor[N, *input_shape] float32``: the samples to predict on, in a fixed order.

    ``data``: ``None`` (the run's own test split, read from its recorded source), a path to an ``.npz``
    holding ``x`` (or the ``x_test`` of the four arrays ``train`` reads), used as given, or a folder of
    images (``DIR/test/<class>/*`` when ``DIR/test`` exists, as ``train`` reads image folders, else
    ``DIR/<class>/*`` and ``DIR/*``; sorted by path). One-line ``ValueError`` for a run that is not
    there, data that cannot be read, or samples of another shape than the run's.
    """
    trained = open_trained_run(run_dir)
    if data is None:
        return run_data(run_dir, cache_dir=cache_dir).test_x.contiguous()
    try:
        path = Path(os.fspath(data))
    except TypeError:
        raise TypeError(f"data: expected a path, got {type(data).__name__}") from None
    shape = tuple(trained.data.input_shape)
    if path.is_file():
        x = _read_npz(path)
    elif path.is_dir():
        x = _read_images(path, shape, read_data_record(trained.run))
    else:
        raise ValueError(f"data: {str(path)!r} does not exist; expected {DATA_NEEDS}")
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"data: samples of shape {tuple(x.shape[1:])} in {str(path)!r}, but {trained.run.root} "
                         f"was trained on samples of shape {shape}")
    return x


def _read_npz(path: Path) -> Tensor:
    def pick(files: list[str]) -> list[str]:
        if "x" not in files and "x_test" not in files:
            raise ValueError(f"data: {str(path)!r} holds no x or x_test array (keys {files})")
        return ["x" if "x" in files else "x_test"]

    (key, x), = read_npz(path, "data", pick).items()
    if x.dtype.kind not in "fiu" or x.ndim < 2:
        raise ValueError(f"data: {key} in {str(path)!r} must be a real-valued array [N, ...], got {x.dtype} "
                         f"of shape {x.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).contiguous()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"data: {key} in {str(path)!r} holds NaN or infinite values")
    return t


def _read_images(root: Path, shape: tuple, record: dict | None) -> Tensor:
    from tqdm import tqdm

    base = root / "test" if (root / "test").is_dir() else root
    files = sorted(f for pattern in ("*", "*/*") for f in base.glob(pattern)
                   if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"data: {str(base)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); expected {DATA_NEEDS}")
    pixels, _, _ = decode_images([(str(f), "", lambda f=f: f) for f in files], f"decoding {base.name}/", tqdm)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"data: images, but the run was trained on samples of shape {shape}, not [C, H, W]")
    if shape[0] == 1:
        if not ((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()):
            raise ValueError(f"data: {str(base)!r} holds colour images, but the run takes one channel (grayscale)")
        pixels = pixels[..., :1]
    x = torch.from_numpy(pixels).to(torch.float32).div_(255.0).permute(0, 3, 1, 2).contiguous()
    if record is None:
        raise ValueError("data: the run records no data normalisation (trained before data records); pass an .npz "
                         "of normalised samples instead")
    norm = record.get("normalization")
    if norm:  # as training normalised: per channel, float32
        mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(norm["std"], dtype=torch.float32).view(1, -1, 1, 1)
        if mean.shape[1] != x.shape[1]:
            raise ValueError(f"data: the run's recorded normalisation has {mean.shape[1]} channels, the images "
                             f"{x.shape[1]}")
        x = ((x - mean) / std).contiguous()
    return x
