"""The CUDA kernels (csrc/cuda/*.cu) compile for sm_80 and sm_90 without register spills.

Needs only nvcc (no GPU): every .cu file is compiled once (module fixture, 2 files at a time) to an
object file with the flags torch's CUDAExtension uses, with ``-Xptxas -v``. Per-kernel registers
and spills are printed (``pytest -s``). Skipped when nvcc or CUDA_HOME is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")
WORKERS = 2
NVCC_TIMEOUT_S = 600


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isdir(home):
        return home
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover
        return None
    return CUDA_HOME if CUDA_HOME and os.path.isdir(CUDA_HOME) else None


def _nvcc(cuda_home: str | None) -> str | None:
    if cuda_home:
        cand = os.path.join(cuda_home, "bin", "nvcc")
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return shutil.which("nvcc")


def _nvcc_command(nvcc: str, cuda_home: str, src: Path, obj: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch: include_paths(cuda: bool)
        includes = cpp_extension.include_paths(True)
    includes = list(includes) + [os.path.join(cuda_home, "include"), sysconfig.get_paths()["include"]]
    common = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    # torch >= 2.10 headers need C++20 (operator<=> in c10); what CUDAExtension passes by default.
    std = "-std=c++20"
    cmd = [nvcc, "-c", str(src), "-o", str(obj)]
    cmd += [f"-I{p}" for p in includes]
    cmd += [
        std,
        "-O3",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DMNN_FAST_WITH_CUDA=1",
        "-Xcompiler",
        "-fPIC",
        "-Xptxas",
        "-v",
    ]
    cmd += common
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return cmd


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(output: str) -> list[dict]:
    """One dict per (kernel, arch): name, arch, registers, stack, spill_stores, spill_loads."""
    rows: list[dict] = []
    cur: dict | None = None
    for line in output.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2), "registers": None, "stack": 0, "spill_stores": 0,
                   "spill_loads": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
            continue
        m = _REGS.search(line)
        if m:
            cur["registers"] = int(m.group(1))
    return rows


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout
        pretty = out.splitlines()
    except Exception:  # pragma: no cover
        return {n: n for n in names}
    if len(pretty) != len(names):
        return {n: n for n in names}
    # Drop the anonymous-namespace noise and the parameter list: "mnn_fast::...::route_count_kernel".
    short = [re.sub(r"\(anonymous namespace\)::", "", p).split("(")[0] for p in pretty]
    return dict(zip(names, short))


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    cuda_home = _cuda_home()
    nvcc = _nvcc(cuda_home)
    if cuda_home is None:
        pytest.skip("CUDA_HOME is not set and torch found no CUDA toolkit")
    if nvcc is None:
        pytest.skip(f"nvcc not found (CUDA_HOME={cuda_home}, PATH has no nvcc)")
    if not CUDA_SOURCES:
        pytest.skip("no csrc/cuda/*.cu sources")
    out_dir = tmp_path_factory.mktemp("cuda_objs")

    def compile_one(src: Path):
        obj = out_dir / (src.stem + ".o")
        cmd = _nvcc_command(nvcc, cuda_home, src, obj)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S, cwd=ROOT)
        return src.name, {
            "returncode": proc.returncode,
            "output": proc.stdout + proc.stderr,
            "obj": obj,
            "seconds": time.monotonic() - t0,
            "cmd": cmd,
        }

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = dict(pool.map(compile_one, CUDA_SOURCES))
    total = time.monotonic() - t0

    all_names = sorted({r["name"] for res in results.values() for r in parse_ptxas(res["output"])})
    pretty = _demangle(all_names)
    print(f"\n[cuda build] nvcc {nvcc}, {len(CUDA_SOURCES)} files, sm_{'/sm_'.join(ARCHS)}: {total:.1f}s total")
    for name, res in results.items():
        print(f"[cuda build] {name}: rc={res['returncode']} in {res['seconds']:.1f}s")
        for r in parse_ptxas(res["output"]):
            print(
                f"    sm_{r['arch']} {pretty.get(r['name'], r['name'])}: {r['registers']} registers, "
                f"stack {r['stack']} B, spill stores {r['spill_stores']} B, spill loads {r['spill_loads']} B"
            )
    sys.stdout.flush()
    return results


@pytest.mark.parametrize("src", [p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles(cuda_build, src):
    res = cuda_build[src]
    assert res["returncode"] == 0, f"nvcc failed on {src}:\n{' '.join(res['cmd'])}\n{res['output'][-8000:]}"
    assert res["obj"].is_file() and res["obj"].stat().st_size > 0, f"nvcc produced no object for {src}"


@pytest.mark.parametrize("src", [p.name for p in CUDA_SOURCES])
def test_cuda_kernels_do_not_spill(cuda_build, src):
    res = cuda_build[src]
    if res["returncode"] != 0:
        pytest.fail(f"{src} did not compile (see test_cuda_source_compiles)")
    rows = parse_ptxas(res["output"])
    assert rows, f"ptxas -v reported no kernel for {src}:\n{res['output'][-4000:]}"
    for arch in ARCHS:
        assert any(r["arch"] == arch for r in rows), f"{src}: no kernel compiled for sm_{arch}"
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"{src}: kernels spill registers: {spilling}"
    assert all(r["registers"] is not None for r in rows), f"{src}: unparsed ptxas output:\n{res['output'][-4000:]}"


@pytest.mark.parametrize("src", [p.name for p in CUDA_SOURCES])
def test_cuda_sources_compile_without_warnings(cuda_build, src):
    """Warnings from our own files (e.g. #177 "declared but never referenced") are bugs here."""
    res = cuda_build[src]
    ours = [l for l in res["output"].splitlines() if "csrc/cuda/" in l and "warning" in l.lower()]
    assert not ours, f"{src}: nvcc warnings:\n" + "\n".join(ours)


def test_each_cuda_file_registers_one_op():
    """One op per file, each registered for the CUDA dispatch key of the mnn_fast library."""
    if not CUDA_SOURCES:
        pytest.skip("no csrc/cuda/*.cu sources")
    for src in CUDA_SOURCES:
        text = src.read_text()
        assert "TORCH_LIBRARY_IMPL(mnn_fast, CUDA, m)" in text, f"{src.name} registers no CUDA kernel"
        assert f'm.impl("{src.stem}"' in text, f"{src.name} must register the op {src.stem!r}"
