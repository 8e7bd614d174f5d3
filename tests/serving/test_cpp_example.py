"""examples/cpp: the C++ program built with CMake against the installed libtorch runs the package
and prints the eager module's log-probabilities bit for bit (docs/serving.md).

The default build loads the Python extension mnn_fast/_C*.so as the op library (lazily: its Python
references are never called), so only main.cpp compiles (~10 s of CPU). Building the op library
itself from csrc/ as well takes ~2 min of CPU; that test is opt-in: MNN_FAST_CPP_FULL_BUILD=1.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import mnn_fast._C
from mnn_fast.training import load_mnn

from serving_cases import INPUT_SHAPE, MAX_BATCH, sample_inputs, tiny

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cpp"
pytestmark = pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("c++")),
                                reason="needs cmake and a C++ compiler")


def build(build_dir: Path, *options: str) -> Path:
    """Configures and builds examples/cpp in ``build_dir``; returns the program."""
    prefix = f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"
    for command in (["cmake", "-S", str(EXAMPLE), "-B", str(build_dir), prefix, *options],
                    ["cmake", "--build", str(build_dir), "-j2"]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return build_dir / "mnn_fast_predict"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cpp_build"), f"-DMNN_FAST_OPS_LIBRARY={mnn_fast._C.__file__}")


def predict(program: Path, package: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), str(package), *args], capture_output=True, text=True, timeout=300)


def printed_log_probs(stdout: str) -> tuple[torch.Tensor, list[int]]:
    """The printed ``Tensor[B, C] float32`` (hex floats read back exactly) and classes."""
    rows = [line for line in stdout.splitlines() if line.startswith("row ")]
    values = torch.tensor([[float.fromhex(v) for v in line.split("log-probs")[1].split()] for line in rows])
    return values, [int(line.split()[3]) for line in rows]


def ramp(batch: int) -> torch.Tensor:
    """The program's default input: x.flatten()[i] = (i % 17) / 16 - 0.5, exact in float32."""
    n = batch * INPUT_SHAPE[0] * INPUT_SHAPE[1] * INPUT_SHAPE[2]
    return ((torch.arange(n) % 17).float() / 16 - 0.5).reshape(batch, *INPUT_SHAPE)


# B=1 (the smallest), 5 (odd) and MAX_BATCH (the top of the package's range), on the default input.
@pytest.mark.parametrize("batch", [1, 5, MAX_BATCH])
def test_cpp_program_prints_the_eager_log_probs(program, case, batch):
    proc = predict(program, case.package, "--batch", str(batch))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, classes = printed_log_probs(proc.stdout)
    want = load_mnn(case.run)(ramp(batch))
    assert torch.equal(got, want)
    assert classes == want.argmax(1).tolist()
    assert f"max batch {MAX_BATCH}" in proc.stdout.splitlines()[0]


def test_cpp_program_reads_an_input_file(program, case, tmp_path):
    x = sample_inputs(7)
    x.numpy().tofile(tmp_path / "x.f32")
    proc = predict(program, case.package, "--batch", "7", "--input", str(tmp_path / "x.f32"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(printed_log_probs(proc.stdout)[0], load_mnn(case.run)(x))


def test_cpp_program_refuses_in_one_line(program, case, tmp_path):
    (tmp_path / "text.pt2").write_text("not a package")
    (tmp_path / "short.f32").write_bytes(b"\0" * 12)
    for args, message in (
        ([str(case.package), "--batch", str(MAX_BATCH + 1)], f"--batch must be in 1..{MAX_BATCH}, got {MAX_BATCH + 1}"),
        ([str(tmp_path / "text.pt2")], "mnn_fast_predict: error: "),
        ([str(case.package), "--ops", str(tmp_path / "none.so")], "cannot load the mnn_fast op library"),
        ([str(case.package), "--input", str(tmp_path / "short.f32")], "expected 256 float32 values"),
    ):
        proc = subprocess.run([str(program), *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


@pytest.mark.skipif(os.environ.get("MNN_FAST_CPP_FULL_BUILD") != "1",
                    reason="opt-in (MNN_FAST_CPP_FULL_BUILD=1): compiles the op library from csrc/, ~2 min of CPU")
def test_op_library_built_from_csrc_gives_the_same_bits(case, tmp_path):
    program = build(tmp_path / "build")
    assert (tmp_path / "build" / "libmnn_fast_ops.so").exists()
    proc = predict(program, case.package, "--batch", str(MAX_BATCH))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(printed_log_probs(proc.stdout)[0], load_mnn(case.run)(ramp(MAX_BATCH)))
