"""int64 index math in every Triton kernel: B·E (and N·D, B·C, P·E) can pass 2**31 (issue 10, item 9).

Tensors that large (8+ GB) cannot be allocated here, so the index arithmetic is checked instead:

* ``_block_start`` (``kernels/__init__.py``), the helper every kernel computes its row / tile / program
  offsets with, is run on tiny tensors with ``index * width > 2**31`` and must return the exact int64
  product (an int32 product wraps).
* Every ``_*_kernel`` in ``kernels/`` is compiled to TTIR for sm_90 (``triton.compile`` with
  ``GPUTarget("cuda", 90, 32)``, in a subprocess without ``TRITON_INTERPRET``, as in
  ``test_triton_aot.py``, for the same cases and configs) and its TTIR must show that each program id
  is sign-extended to i64 before any arithmetic, and that no integer multiply is narrower than i64:
  in these kernels every multiply is an index product (a row, tile or program times a width).
  Reverting any kernel to ``pid * E`` / ``pid * BLOCK`` in int32 makes these tests fail.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # the TTIR worker runs this file as a script
    sys.path.insert(0, str(ROOT))

from kernels import _block_start  # noqa: E402

_MARK = "TTIR-RESULTS-JSON:"


def _load_aot():
    """``tests/test_triton_aot.py`` as a module: its CASES and signatures, so both tests follow any retuning."""
    spec = importlib.util.spec_from_file_location("_mnn_triton_aot_cases", Path(__file__).with_name("test_triton_aot.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_AOT = _load_aot()
CASES = _AOT.CASES


# --------------------------------------------------------------------------------------------
# _block_start under the interpreter (or compiled, on a GPU)
# --------------------------------------------------------------------------------------------
@triton.jit
def _block_start_probe_kernel(out_ptr, index, width, WIDTH: tl.constexpr):
    """Row ``pid`` of ``out: [P, 3] i64`` = ``(pid * width, pid * WIDTH, (index + pid) * width)`` via ``_block_start``."""
    pid = tl.program_id(0)
    row = out_ptr + _block_start(pid, 3)
    tl.store(row + 0, _block_start(pid, width))
    tl.store(row + 1, _block_start(pid, WIDTH))
    tl.store(row + 2, _block_start(index + pid, width))


@pytest.mark.parametrize(
    "index, width, const_width",
    [
        (2**31 - 4, 2**31 - 1, 2**30 + 3),  # every product past 2**31 at pid 2; (index + pid) * width ~ 2**62
        (100_000, 50_000, 2**30),  # B * E = 5e9: a realistic size, and 2 * 2**30 == 2**31 exactly
        (7, 3, 5),  # small values stay exact
    ],
)
def test_block_start_is_exact_int64(index, width, const_width):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    programs = 3
    out = torch.full((programs, 3), -1, dtype=torch.int64, device=device)
    _block_start_probe_kernel[(programs,)](out, index, width, WIDTH=const_width)
    want = torch.tensor(
        [[p * width, p * const_width, (index + p) * width] for p in range(programs)], dtype=torch.int64
    )
    assert torch.equal(out.cpu(), want), f"_block_start is not an exact int64 product:\n{out.cpu()}\n!=\n{want}"
    if index > 2**20:
        assert int(want.max()) >= 2**31  # the case really exercises products past int32


# --------------------------------------------------------------------------------------------
# TTIR of every kernel: worker (runs in the subprocess, TRITON_INTERPRET unset)
# --------------------------------------------------------------------------------------------
def _worker() -> None:
    import importlib
    import pkgutil

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    import kernels

    all_kernels = sorted(
        name
        for info in pkgutil.iter_modules(kernels.__path__)
        for name, obj in vars(importlib.import_module(f"kernels.{info.name}")).items()
        if isinstance(obj, JITFunction) and name.endswith("_kernel")
    )
    results = []
    for case, kind, src in CASES:
        fn, sig, cx = _AOT._kernel_and_signature(kind, src)
        assert isinstance(fn, JITFunction), f"{fn!r} is not a JITFunction: TRITON_INTERPRET leaked into the worker"
        signature = dict(sig, **{k: "constexpr" for k in cx})
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32)
        )
        results.append({"case": case, "kernel": fn.__name__, "ttir": compiled.asm["ttir"]})
    print(_MARK + json.dumps({"kernels": all_kernels, "results": results}))


# --------------------------------------------------------------------------------------------
# TTIR checks (parent process; TRITON_INTERPRET may be set here)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ttir():
    from helpers import run_worker

    return run_worker(Path(__file__), _MARK, ROOT)


def _ops(text: str) -> list[str]:
    """The TTIR's operation lines, without ``loc(...)`` suffixes and the ``#loc`` table."""
    lines = (re.sub(r"\s+loc\(.*$", "", ln).strip() for ln in text.splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#loc")]


_PROGRAM_ID = re.compile(r"^(%[\w.$-]+) = tt\.get_program_id [xyz] : i32$")
_MULI = re.compile(r"\barith\.muli\b[^:]*:\s*(?:tensor<(?:\d+x)*)?(i\d+)")


def _program_id_uses(ops: list[str]) -> dict[str, list[str]]:
    """Each ``tt.get_program_id`` result -> the operation lines that use it."""
    uses = {}
    for ln in ops:
        m = _PROGRAM_ID.match(ln)
        if m:
            uses[m.group(1)] = []
    for name in uses:
        token = re.compile(re.escape(name) + r"(?![\w.$-])")
        uses[name] = [ln for ln in ops if token.search(ln) and not _PROGRAM_ID.match(ln)]
    return uses


def test_every_kernel_is_checked(ttir):
    checked = {r["kernel"] for r in ttir["results"]}
    assert ttir["kernels"], "no _*_kernel found in kernels/"
    assert set(ttir["kernels"]) <= checked, f"kernels without a TTIR case: {set(ttir['kernels']) - checked}"


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_program_ids_widen_to_i64_first(ttir, case):
    """Each program id's only uses are ``arith.extsi ... : i32 to i64``: no i32 arithmetic on a program id."""
    r = next(r for r in ttir["results"] if r["case"] == case)
    uses = _program_id_uses(_ops(r["ttir"]))
    assert uses, f"{case}: no tt.get_program_id in the TTIR of {r['kernel']}"
    for name, lines in uses.items():
        assert lines, f"{case}: program id {name} unused"
        bad = [ln for ln in lines if not re.search(re.escape(name) + r" : i32 to i64$", ln) or "arith.extsi" not in ln]
        assert not bad, (
            f"{case}: {r['kernel']} uses program id {name} before widening it to int64 "
            f"(int64: B·E can pass 2**31; use _block_start):\n" + "\n".join(bad)
        )


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_no_narrow_integer_multiply(ttir, case):
    """Every ``arith.muli`` is i64: in these kernels each multiply is a row / tile / program offset."""
    r = next(r for r in ttir["results"] if r["case"] == case)
    muls = [(ln, m.group(1)) for ln in _ops(r["ttir"]) for m in [_MULI.search(ln)] if m]
    assert any(t == "i64" for _, t in muls), f"{case}: no i64 multiply found; TTIR format changed?"
    narrow = [ln for ln, t in muls if t != "i64"]
    assert not narrow, (
        f"{case}: {r['kernel']} multiplies indices in less than 64 bits "
        f"(int64: B·E can pass 2**31; use _block_start):\n" + "\n".join(narrow)
    )


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
