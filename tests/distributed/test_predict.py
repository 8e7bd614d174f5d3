"""``mnn-fast predict`` / ``mnn_fast.distributed.predict``: the same bytes for every process count,
the module's exact log-probabilities in the CSV, own data, and one-line refusals.

One spawned pair of ranks (the costly part, a few seconds) is compared with the single-process file;
the torchrun path is checked in this process on a one-rank group.
"""
from __future__ import annotations

import datetime
import multiprocessing

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from ep_cases import free_port
from mnn_fast import cli
from mnn_fast.distributed import prediction as predict_mod
from mnn_fast.distributed import predict, read_predictions
from mnn_fast.training import RunDir, load_mnn, run_data

BATCH = 64  # digits' 539 test rows: 8 full chunks and one of 27; with 2 ranks, rank 1's last call is empty


def module_log_probs(run, x, threshold=0.25, batch=BATCH):
    """The single-process module on each chunk, one thread: what every row of the file must hold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mnn = load_mnn(run, threshold)
        with torch.no_grad():
            return torch.cat([mnn(x[s: s + batch].clone()) for s in range(0, len(x), batch)])
    finally:
        torch.set_num_threads(before)


def check_file(path, want):
    index, prediction, log_probs = read_predictions(path)
    assert torch.equal(log_probs, want)  # repr round trip: the exact float32 bits
    assert torch.equal(prediction, want.argmax(1))
    assert torch.equal(index, torch.arange(len(want)))


def test_one_and_two_processes_write_the_same_bytes(tiny_run, tmp_path, capsys):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert predict(tiny_run, out=one, batch_size=BATCH, progress=False) == one
    assert cli.main(["predict", str(tiny_run), "--out", str(two), "--nproc", "2", "--batch-size", str(BATCH)]) == 0
    assert f"written: {two}" in capsys.readouterr().out
    assert one.read_bytes() == two.read_bytes()
    check_file(one, module_log_probs(tiny_run, run_data(tiny_run).test_x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "two.csv"]  # no temporary left
    header = one.read_text().splitlines()[0]
    assert header == "index,prediction," + ",".join(f"log_prob_{c}" for c in range(10))


@pytest.fixture
def group1():
    """A one-rank group in this process, as torchrun's would be: predict joins it."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


def test_a_rank_of_an_existing_group_writes_the_same_file(tiny_run, tmp_path, group1):
    # An odd batch size and threshold: the file depends on both, and joined and alone must agree.
    joined = predict(tiny_run, out=tmp_path / "joined.csv", batch_size=50, threshold=0.1, progress=False)
    assert dist.is_initialized()  # the caller's group is left as it was
    with pytest.raises(ValueError, match="nproc=2, but this process is one rank of a group of 1"):
        predict(tiny_run, nproc=2, out=tmp_path / "x.csv")
    dist.destroy_process_group()
    alone = predict(tiny_run, out=tmp_path / "alone.csv", batch_size=50, threshold=0.1, progress=False)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    assert joined.read_bytes() == alone.read_bytes()
    check_file(alone, module_log_probs(tiny_run, run_data(tiny_run).test_x, 0.1, 50))


@pytest.mark.parametrize("key", ["x", "x_test"])  # predict's own key, and train's arrays layout
def test_npz_data_is_used_as_given(tiny_run, tmp_path, key):
    x = torch.randn(70, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    arrays = {key: x.numpy()}
    if key == "x_test":
        arrays.update(x_train=x.numpy(), y_train=np.zeros(70, np.int64), y_test=np.zeros(70, np.int64))
    np.savez(tmp_path / "data.npz", **arrays)
    out = predict(tiny_run, tmp_path / "data.npz", out=tmp_path / "p.csv", batch_size=BATCH, progress=False)
    check_file(out, module_log_probs(tiny_run, x))


@pytest.mark.parametrize("rows", [0, 1])  # no chunk at all (a header only), and one chunk of one row
def test_edge_sizes(tiny_run, tmp_path, rows):
    x = torch.randn(rows, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    np.savez(tmp_path / "data.npz", x=x.numpy())
    out = predict(tiny_run, tmp_path / "data.npz", out=tmp_path / "p.csv", progress=False)
    assert len(out.read_text().splitlines()) == 1 + rows
    check_file(out, module_log_probs(tiny_run, x) if rows else torch.empty(0, 10))


def test_image_folder_is_decoded_and_kept_to_one_channel(tiny_run, tmp_path):
    pixels = torch.randint(0, 256, (5, 8, 8), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i, p in enumerate(pixels):  # one in a class folder, the others loose: both are read, sorted by path
        Image.fromarray(p.numpy(), mode="L").save(tmp_path / "imgs" / ("a" if i == 0 else "") / f"{i}.png")
    out = predict(tiny_run, tmp_path / "imgs", out=tmp_path / "p.csv", progress=False)
    order = [1, 2, 3, 4, 0]  # "0.png", "1.png", ... then "a/0.png"... sorted paths: imgs/1.png < imgs/a/0.png
    x = pixels[order].float().div(255).unsqueeze(1)  # digits runs record no normalisation: [0, 1] pixels
    check_file(out, module_log_probs(tiny_run, x))


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/no_run"], "no_run/config.json: no such file"),
    (["{run}", "--nproc", "0"], "nproc must be a positive int, got 0"),
    (["{run}", "--batch-size", "0"], "batch_size must be a positive int, got 0"),
    (["{run}", "--out", "{tmp}"], "is a directory; expected the CSV file's path"),
    (["{run}", "--threshold", "1.5"], "threshold must be in [0, 1]"),
    (["{run}", "--data", "{tmp}/garbage.npz"], "is not a readable .npz"),
    (["{run}", "--data", "{tmp}/flat.npz"], "samples of shape (64,)"),
    (["{run}", "--data", "{tmp}/missing.npz"], "does not exist"),
    (["{run}", "--data", "{tmp}/colour"], "holds colour images, but the run takes one channel"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys, argv, message):
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    np.savez(tmp_path / "flat.npz", x=np.zeros((4, 64), np.float32))  # digits flattened: not the run's [1, 8, 8]
    (tmp_path / "colour").mkdir()
    Image.fromarray(np.full((8, 8, 3), (255, 0, 0), np.uint8)).save(tmp_path / "colour" / "red.png")
    out = tmp_path / "out" / "p.csv"
    argv = ["predict"] + [a.format(run=tiny_run, tmp=tmp_path) for a in argv] + ([] if "--out" in argv else ["--out", str(out)])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err  # an image folder's decoding bar may come first
    last = err.splitlines()[-1]
    assert last.startswith("mnn-fast predict: error:") and message in last and "Traceback" not in err, err
    assert not out.exists()


def test_ctrl_c_ends_the_ranks_and_leaves_no_file(tiny_run, tmp_path, monkeypatch, capsys):
    started = []

    def interrupted(procs, grace=30.0):
        started.extend(procs)
        raise KeyboardInterrupt

    monkeypatch.setattr(predict_mod, "_wait", interrupted)
    assert cli.main(["predict", str(tiny_run), "--nproc", "2", "--out", str(tmp_path / "p.csv")]) == 130
    assert "mnn-fast predict: interrupted; nothing was left half-written" in capsys.readouterr().err
    assert len(started) == 2 and not any(p.is_alive() for p in started)
    assert list(tmp_path.iterdir()) == []


def test_a_rank_error_is_raised_with_its_own_type():
    # The failing rank's ValueError wins over the others' RuntimeError saying that it failed.
    reports = [(0, "RuntimeError", "rank(s) [1] failed loading"), (1, "ValueError", "rank 1 holds specialist(s) [7]")]
    with pytest.raises(ValueError, match=r"rank 1 holds specialist\(s\) \[7\]"):
        predict_mod._raise_first(reports, [])
    with pytest.raises(RuntimeError, match="rank 0 failed: KeyError: 'x'"):
        predict_mod._raise_first([(0, "KeyError", "'x'")], [])
    dead = multiprocessing.get_context("spawn").Process(target=int)
    dead.start(), dead.join()
    dead._popen.returncode = -9  # as a rank killed by the OOM killer
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[0\] exited with code\(s\) \[-9\]"):
        predict_mod._raise_first([], [dead])
