"""What a run was trained on: ``RUN/data.json``, written when a run starts and checked ever after.

It records the data's source (how to read it again, or ``None`` for tensors handed over from
Python), a fingerprint of the tensors, the classes, the input shape and the normalisation. Commands
read a run's data from it, never from a default, and refuse data whose fingerprint differs.
"""
from __future__ import annotations

from .. import io
from .data import Splits, load_source
from .owndata import fingerprint
from .rundir import RunDir

__all__ = ["FORMAT", "data_record", "save_or_check_data_record", "read_data_record", "check_same_data", "reload_splits"]

FORMAT = "mnn_fast.data/1"


def data_record(splits: Splits) -> dict:
    """The JSON record of ``splits`` (its fingerprint hashes every tensor: seconds for CIFAR-10)."""
    return {"format": FORMAT, "name": splits.name, "source": splits.source, "fingerprint": fingerprint(splits),
            "num_classes": splits.num_classes, "input_shape": list(splits.input_shape), "classes": list(splits.classes),
            "normalization": splits.normalization, "num_train": len(splits.train_y), "num_test": len(splits.test_y)}


def read_data_record(run: RunDir) -> dict | None:
    """``RUN/data.json``, or ``None`` for a run from before the record existed."""
    if not run.data.exists():
        return None
    record = io.load_json(run.data)
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("fingerprint"), str):
        raise ValueError(f"{run.data}: not a data record written by mnn_fast")
    return record


def check_same_data(run: RunDir, record: dict | None, splits: Splits) -> None:
    """``ValueError`` in one line when ``splits`` are not the data ``record`` says the run trained on."""
    if record is None:
        return
    got = fingerprint(splits)
    if got != record["fingerprint"]:
        raise ValueError(f"data: {run.root} was trained on {_describe(record)} (fingerprint {record['fingerprint'][:12]}), "
                         f"not on the data given ({splits.name!r}, {len(splits.train_y)}+{len(splits.test_y)} samples, "
                         f"fingerprint {got[:12]})")


def save_or_check_data_record(run: RunDir, splits: Splits) -> None:
    """A new run records ``splits``; a resumed one must be given the same data."""
    record = read_data_record(run)
    if record is None:
        io.save_json(run.data, data_record(splits))
    else:
        check_same_data(run, record, splits)


def reload_splits(run: RunDir, record: dict | None, cache_dir=None) -> Splits:
    """The run's data read again from its recorded source and checked against its fingerprint.
    ``ValueError`` when the data was handed over from Python (nothing to read it from)."""
    source = record["source"]
    if source is None:
        raise ValueError(f"data: {run.root} was trained on data handed over from Python ({_describe(record)}), "
                         "which cannot be read again; pass the same splits (load_mnn(run, splits=...)) or name its "
                         "source (--dataset/--data-path)")
    splits = load_source(source, cache_dir)
    check_same_data(run, record, splits)
    return splits


def _describe(record: dict) -> str:
    source = record.get("source") or {}
    where = f" from {source['data_path']}" if source.get("data_path") else ""
    return f"{source.get('dataset', 'Python tensors')} {record.get('name')!r}{where}"
