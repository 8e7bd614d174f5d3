"""``mnn-fast export`` and ``load_exported`` (docs/serving.md): the package's output against the eager
module, bitwise; the record; every refusal (corrupted, foreign, other run, bad input, switch_fn,
untraceable specialists). One tiny package (tests/serving/serving_cases.py) serves the whole file."""
import json
import struct
import zipfile

import pytest
import torch
from torch import nn

import mnn_fast
from mnn_fast import MetaNeuralNetwork
from mnn_fast.serving import export_mnn, read_record, run_fingerprint
from mnn_fast.training import load_mnn

from serving_cases import GROUPS, INPUT_SHAPE, MAX_BATCH, sample_inputs, tiny


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(case):
    return mnn_fast.load_exported(case.package, expected_run=case.run)


@pytest.fixture(scope="module")
def eager(case):
    return load_mnn(case.run)


# B=1: the smallest batch, a single routed row per expert at most; 7: odd, not the traced size (8);
# MAX_BATCH: the top of the dynamic range. Threads 1 and 2: the kernels split work by thread count.
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("batch", [1, 7, MAX_BATCH])
def test_package_output_is_bitwise_the_eager_module(exported, eager, batch, threads):
    x = sample_inputs(batch)
    want, routing = eager(x, return_routing=True)
    got = exported(x)
    assert got.dtype == torch.float32 and got.shape == (batch, len(sum(GROUPS, [])))
    assert torch.equal(got, want)
    if batch == MAX_BATCH:  # the inputs exercise every routing width: rows with 1, 2 and 3 experts
        per_row = routing.sample_offsets[1:] - routing.sample_offsets[:-1]
        assert set(per_row.tolist()) == {1, 2, 3}


def test_record_describes_the_run(case, exported):
    record = read_record(case.package)
    assert record["run_fingerprint"] == run_fingerprint(case.run) == exported.run_fingerprint
    assert record["mnn_fast_version"] == mnn_fast.__version__
    assert record["input_shape"] == list(INPUT_SHAPE) and exported.input_shape == INPUT_SHAPE
    assert record["classes"] == [str(c) for c in range(10)] and record["num_classes"] == 10
    assert record["max_batch"] == MAX_BATCH and record["threshold"] == 0.25 and record["groups"] == GROUPS


def test_export_command_reports_phases_and_time(case):
    lines = case.log.splitlines()
    for phase in ("loading", "tracing with torch.export", "compiling with AOTInductor", "wrote"):
        assert any(line.startswith(f"mnn-fast export: {phase}") for line in lines), phase
    assert lines[-1].startswith(f"written: {case.package} (export took ")


def test_expected_run_accepts_the_run_and_its_fingerprint(case):
    assert mnn_fast.load_exported(case.package, expected_run=run_fingerprint(case.run)).max_batch == MAX_BATCH


def test_package_from_another_run_is_refused(case):
    # Same config, another seed: other weights, so another fingerprint.
    with pytest.raises(ValueError, match="exported from another run"):
        mnn_fast.load_exported(case.package, expected_run=case.other_run)
    with pytest.raises(ValueError, match="exported from another run"):
        mnn_fast.load_exported(case.package, expected_run="0" * 64)


def test_truncated_package_is_refused(case, tmp_path):
    data = case.package.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):  # inside the compiled library; inside the zip's directory
        path = tmp_path / f"cut{cut}.pt2"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="corrupted or truncated") as info:
            mnn_fast.load_exported(path)
        assert "\n" not in str(info.value)


def test_flipped_bit_is_refused(case, tmp_path):
    data = bytearray(case.package.read_bytes())
    with zipfile.ZipFile(case.package) as archive:
        member = max(archive.infolist(), key=lambda i: i.file_size)  # the compiled library
    # The member's bytes start after its local header: 30 bytes, then its name and extra field
    # (whose lengths the header gives; torch pads the extra field to align the data).
    name_len, extra_len = struct.unpack_from("<HH", data, member.header_offset + 26)
    start = member.header_offset + 30 + name_len + extra_len
    for offset in (start + 7, start + member.compress_size // 2):
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        path = tmp_path / "flipped.pt2"
        path.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="fails its CRC check|corrupted"):
            mnn_fast.load_exported(path)


def _rewrite(source, target, record=None, drop_record=False):
    """``source``'s zip with its mnn_fast record replaced by ``record``, or left out."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("extra/mnn_fast.json"):
                if drop_record:
                    continue
                dst.writestr(info, json.dumps(record))
            else:
                dst.writestr(info, src.read(info))


def test_packages_mnn_fast_did_not_write_are_refused(case, tmp_path):
    # An AOTInductor package without the record: what torch alone writes.
    _rewrite(case.package, tmp_path / "plain.pt2", drop_record=True)
    with pytest.raises(ValueError, match="not a package written by mnn_fast"):
        mnn_fast.load_exported(tmp_path / "plain.pt2")
    (tmp_path / "text.pt2").write_text("not a zip")
    with pytest.raises(ValueError, match="corrupted or truncated"):
        mnn_fast.load_exported(tmp_path / "text.pt2")
    with pytest.raises(ValueError, match="no such package file"):
        mnn_fast.load_exported(tmp_path / "missing.pt2")
    record = read_record(case.package)
    _rewrite(case.package, tmp_path / "format.pt2", {**record, "format": "someone.else/1"})
    with pytest.raises(ValueError, match="record format 'someone.else/1'"):
        mnn_fast.load_exported(tmp_path / "format.pt2")


def test_record_from_another_package_is_refused(case, tmp_path):
    # The compiled model carries its own copy of the fingerprint; a swapped record disagrees with it.
    record = {**read_record(case.package), "run_fingerprint": run_fingerprint(case.other_run)}
    _rewrite(case.package, tmp_path / "swapped.pt2", record)
    with pytest.raises(ValueError, match="disagree on the run"):
        mnn_fast.load_exported(tmp_path / "swapped.pt2")


def test_package_of_another_torch_or_mnn_fast_version_is_refused(case, tmp_path):
    record = read_record(case.package)
    for field, value, match in (("torch_version", "1.13.0", "built with torch 1.13.0"),
                                ("mnn_fast_version", "0.0.1", "built with mnn_fast 0.0.1")):
        _rewrite(case.package, tmp_path / "old.pt2", {**record, field: value})
        with pytest.raises(ValueError, match=match):
            mnn_fast.load_exported(tmp_path / "old.pt2")


@pytest.mark.parametrize("x, error, match", [
    (torch.zeros(0, *INPUT_SHAPE), ValueError, "batch 0; this package takes 1 to 64 rows"),  # B=0
    (torch.zeros(MAX_BATCH + 1, *INPUT_SHAPE), ValueError, "batch 65"),  # one above max batch
    (torch.zeros(3, 64), ValueError, r"shape \[B, 1, 8, 8\], got \(3, 64\)"),  # flattened samples
    (torch.zeros(3, 1, 8, 9), ValueError, r"shape \[B, 1, 8, 8\]"),  # one size off
    (torch.zeros(3, *INPUT_SHAPE, dtype=torch.float64), TypeError, "float32, got torch.float64"),
    ([[0.0]], TypeError, "torch.Tensor, got list"),
])
def test_bad_input_is_refused(exported, x, error, match):
    with pytest.raises(error, match=match):
        exported(x)


def test_non_contiguous_input_gives_the_same_output(exported):
    x = sample_inputs(6)
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert torch.equal(exported(strided), exported(x))


def test_switch_fn_is_refused(eager, tmp_path):
    eager.switch_fn = lambda scores: scores > 0.3
    try:
        with pytest.raises(ValueError, match="switch_fn: a Python callable cannot be exported"):
            export_mnn(eager, tmp_path / "m.pt2", INPUT_SHAPE)
    finally:
        eager.switch_fn = None
    assert not (tmp_path / "m.pt2").exists()


class BranchesOnValues(nn.Module):
    """A specialist whose forward branches in Python on its input's values: not traceable."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return -self.inner(x)


def test_untraceable_specialist_is_refused_in_one_line(eager, tmp_path):
    mnn = MetaNeuralNetwork(eager.switch, [BranchesOnValues(s) for s in eager.specialists], groups=GROUPS,
                            num_classes=10)
    with pytest.raises(ValueError, match=r"cannot export: torch.export could not trace the module at "
                                         r"test_export.py:\d+ \('if x.sum\(\) > 0:'\)") as info:
        export_mnn(mnn, tmp_path / "m.pt2", INPUT_SHAPE)
    assert "\n" not in str(info.value)
    assert mnn.training  # the module's mode is restored
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_batch=0), ValueError, "max_batch must be a positive int, got 0"),
    (dict(input_shape=[]), ValueError, "input_shape must be one sample's shape"),
    (dict(out="model.zip"), ValueError, "out must be a path ending in .pt2"),
    (dict(classes=["a", "b"]), ValueError, "classes has 2 names but the module has 10 classes"),
])
def test_bad_export_arguments_are_refused(eager, tmp_path, kwargs, error, match):
    args = dict(out=tmp_path / "m.pt2", input_shape=INPUT_SHAPE) | kwargs
    with pytest.raises(error, match=match):
        export_mnn(eager, args.pop("out"), args.pop("input_shape"), **args)


def test_export_command_refuses_in_one_line(case, tmp_path, capsys):
    from mnn_fast import cli

    assert cli.main(["export", str(case.run), "--out", str(tmp_path / "m.pt2"), "--max-batch", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mnn-fast export: error: max_batch must be a positive int, got 0"
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "m.pt2")]) == 2
    assert "config.json" in capsys.readouterr().err  # not a run directory


def test_cli_default_max_batch_is_the_library_default():
    from mnn_fast import cli
    from mnn_fast.serving import DEFAULT_MAX_BATCH

    args = cli.build_parser().parse_args(["export", "run", "--out", "m.pt2"])
    assert args.max_batch == DEFAULT_MAX_BATCH


def test_run_fingerprint_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="not a run directory or bundle"):
        run_fingerprint(tmp_path)


def test_bundle_exports_with_its_own_fingerprint(case, eager, tmp_path):
    # A bundle (save_bundle) holds the same networks as the run, under another fingerprint.
    from mnn_fast.serving import export_run
    from mnn_fast.training import save_bundle

    bundle = save_bundle(tmp_path / "bundle", eager, "mlp", "mlp", INPUT_SHAPE)
    record = export_run(bundle, tmp_path / "bundle.pt2", max_batch=4)
    assert record["run_fingerprint"] == run_fingerprint(bundle) != run_fingerprint(case.run)
    model = mnn_fast.load_exported(tmp_path / "bundle.pt2", expected_run=bundle)
    x = sample_inputs(3)
    assert torch.equal(model(x), eager(x)) and model.max_batch == 4
