"""Ahead-of-time compile of every Triton kernel to sm_80 and sm_90 cubins; no GPU needed.

Each kernel is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for
the block sizes its op really launches (taken from the op modules' ``_*_config`` functions), and
must produce a cubin without register spills. ``pytest -s`` prints ``n_regs`` / ``n_spills``.

The compiles run in a subprocess with ``TRITON_INTERPRET`` removed: under the interpreter
``@triton.jit`` returns ``InterpretedFunction`` objects, which ``triton.compile`` cannot take, and the
interpreter setting is read once, when the kernels are decorated.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CCS = (80, 90)
_MARK = "AOT-RESULTS-JSON:"

# (case id, kernel, config source). The worker turns the config source into constexprs through the
# op module's own config function, so the test follows any retuning of block sizes.
CASES = [
    ("gather_f32_D100", "gather", {"dtype": "fp32", "D": 100}),
    ("gather_f16_D7", "gather", {"dtype": "fp16", "D": 7}),
    ("gather_bf16_D4096", "gather", {"dtype": "bf16", "D": 4096}),
    ("gather_f64_D100", "gather", {"dtype": "fp64", "D": 100}),
    ("combine_C10", "combine", {"C": 10}),
    ("combine_C1000", "combine", {"C": 1000}),
    # recombine walks the columns in chunks of 16 whatever C: C=1000 must use the registers of C=10.
    ("recombine_C10", "recombine", {"C": 10, "binary": False}),
    ("recombine_C1000", "recombine", {"C": 1000, "binary": False}),
    ("recombine_binary_C10", "recombine", {"C": 10, "binary": True}),
    ("group_scores_E10", "group_scores", {"E": 10}),
    ("group_scores_E100", "group_scores", {"E": 100}),
    ("route_count_E10_topk", "route_count", {"B": 100_000, "E": 10, "top_k": True}),
    ("route_count_E100", "route_count", {"B": 100_000, "E": 100, "top_k": False}),
    ("route_count_E100_topk", "route_count", {"B": 100_000, "E": 100, "top_k": True}),
    ("route_count_E1000_topk", "route_count", {"B": 100_000, "E": 1000, "top_k": True}),
    ("route_fill_E100", "route_fill", {"B": 100_000, "E": 100, "top_k": False}),
    ("route_fill_E100_topk", "route_fill", {"B": 100_000, "E": 100, "top_k": True}),
    ("route_fill_E1000_topk", "route_fill", {"B": 100_000, "E": 1000, "top_k": True}),
    # top-k alone: the threshold test becomes a NaN test on the raw scores
    ("route_count_E100_topk_only", "route_count", {"B": 100_000, "E": 100, "top_k": True, "threshold": False}),
    ("route_fill_E100_topk_only", "route_fill", {"B": 100_000, "E": 100, "top_k": True, "threshold": False}),
    # The grouped Linear executor: gathered float32 rows with bias (first layer), 16-bit types on
    # tensor cores, and the plain (already gathered) form of the later layers.
    ("segment_linear_f32_gather", "segment_linear", {"dtype": "fp32", "K": 512, "M": 64, "gather": True, "bias": True}),
    ("segment_linear_bf16_gather", "segment_linear", {"dtype": "bf16", "K": 512, "M": 64, "gather": True, "bias": True}),
    ("segment_linear_f16", "segment_linear", {"dtype": "fp16", "K": 64, "M": 1000, "gather": False, "bias": True}),
    ("segment_linear_f32_nobias", "segment_linear", {"dtype": "fp32", "K": 64, "M": 10, "gather": False, "bias": False}),
]


# --------------------------------------------------------------------------------------------
# Worker (runs in the subprocess, TRITON_INTERPRET unset)
# --------------------------------------------------------------------------------------------
def _kernel_and_signature(kind: str, src: dict):
    """``(JITFunction, signature without constexprs, constexprs)`` for one case."""
    import kernels.combine as combine
    import kernels.gather as gather
    import kernels.group_scores as group_scores
    import kernels.recombine as recombine
    import kernels.route as route
    import kernels.segment_linear as segment_linear

    i32 = "i32"
    if kind == "segment_linear":
        import torch

        t = "*" + src["dtype"]
        sig = {"x_ptr": t, "src_ptr": "*i64", "w_ptr": t, "b_ptr": t, "tile_start_ptr": "*i64",
               "tile_expert_ptr": "*i64", "offsets_ptr": "*i64", "out_ptr": t, "K": i32, "M": i32, "E": i32, "w_stride": i32,
               "b_stride": i32}
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[src["dtype"]]
        cx = dict(HAS_BIAS=src["bias"], GATHER=src["gather"], IEEE=dtype == torch.float32, UPCAST=False,
                  **segment_linear._segment_linear_config(src["K"], src["M"], dtype))
        return segment_linear._segment_linear_kernel, sig, cx
    if kind == "gather":
        t = "*" + src["dtype"]
        sig = {"x_ptr": t, "perm_ptr": "*i64", "out_ptr": t, "N": i32, "D": i32}
        return gather._gather_kernel, sig, gather._gather_config(src["D"])
    if kind == "combine":
        sig = {
            "logp_ptr": "*fp32", "logv_ptr": "*fp32", "sample_offsets_ptr": "*i64", "sample_rows_ptr": "*i64",
            "out_ptr": "*fp32", "B": i32, "C": i32,
        }
        return combine._combine_kernel, sig, combine._combine_config(src["C"])
    if kind == "recombine":
        sig = {
            "logp_ptr": "*fp32", "logits_ptr": "*fp32", "offsets_ptr": "*i64", "group_offsets_ptr": "*i64",
            "group_classes_ptr": "*i64", "log_spread_ptr": "*fp32", "sample_offsets_ptr": "*i64",
            "sample_rows_ptr": "*i64", "stamp_ptr": "*i32", "out_ptr": "*fp32", "B": i32, "C": i32, "E": i32,
        }
        return recombine._recombine_kernel, sig, dict(recombine._recombine_config(src["C"]), BINARY=src["binary"])
    if kind == "group_scores":
        sig = {
            "probs_ptr": "*fp32", "group_offsets_ptr": "*i64", "group_classes_ptr": "*i64", "out_ptr": "*fp32",
            "B": i32, "C": i32, "E": i32,
        }
        return group_scores._group_scores_kernel, sig, group_scores._group_scores_config(src["E"])
    cfg = route._route_config(src["B"], src["E"], src["top_k"], src.get("threshold", True))
    cx = {k: cfg[k] for k in ("BLOCK_B", "BLOCK_E", "USE_TOP_K", "HAS_THRESHOLD")}
    if kind == "route_count":
        sig = {
            "scores_ptr": "*fp32", "kth_key_ptr": "*i32", "cut_ptr": "*i32", "sample_counts_ptr": "*i64",
            "program_counts_ptr": "*i32", "B": i32, "E": i32, "threshold_key": i32, "top_k": i32,
            "blocks_per_program": i32,
        }
        return route._route_count_kernel, sig, dict(cx, ONE_TILE=cfg["ONE_TILE"])
    if kind == "route_fill":
        sig = {
            "scores_ptr": "*fp32", "kth_key_ptr": "*i32", "cut_ptr": "*i32", "sample_offsets_ptr": "*i64",
            "cursor_ptr": "*i64", "perm_ptr": "*i64", "sample_rows_ptr": "*i64", "B": i32, "E": i32,
            "threshold_key": i32, "blocks_per_program": i32,
        }
        return route._route_fill_kernel, sig, cx
    raise ValueError(kind)


def _compile_options(kind: str) -> dict:
    """The compile options the op passes at launch (recombine: no fused multiply-add)."""
    if kind == "recombine":
        import kernels.recombine as recombine

        return dict(recombine._LAUNCH_OPTIONS)
    return {}


# Cases whose kernels must round every float op on its own, as the reference does (rowmath.py).
EXACT_FLOAT_CASES = [c[0] for c in CASES if c[1] == "recombine"]


def _ptxas_usage(ptx: str, cc: int) -> tuple[int, int]:
    """``(registers, spill-store bytes)`` from ``ptxas -v`` on the kernel's PTX, with Triton's flags.

    A CompiledKernel only learns n_regs / n_spills when the driver loads it on a GPU; without one,
    the same ptxas Triton used reports them.
    """
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(cc).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cc)}", src,
               "-o", src + ".o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert regs and spills, log
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def _driver_usage(kernel, cc: int):
    """n_regs / n_spills from the driver when a GPU of this capability is present, else None."""
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.get_device_capability() != divmod(cc, 10):
            return None
        kernel._init_handles()
        return kernel.n_regs, kernel.n_spills
    except Exception:  # noqa: BLE001 - only a cross-check
        return None


def _worker() -> None:
    sys.path.insert(0, str(ROOT))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    results = []
    for case, kind, src in CASES:
        fn, sig, cx = _kernel_and_signature(kind, src)
        assert isinstance(fn, JITFunction), f"{fn!r} is not a JITFunction: TRITON_INTERPRET leaked into the worker"
        signature = dict(sig, **{k: "constexpr" for k in cx})
        assert list(signature) == fn.arg_names, f"{fn.__name__}: signature {list(signature)} != {fn.arg_names}"
        # torch allocations are 256-byte aligned: the JIT specialises such pointers the same way.
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
        for cc in CCS:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", cc, 32),
                options=_compile_options(kind),
            )
            cubin = compiled.asm["cubin"]
            regs, spills = _ptxas_usage(compiled.asm["ptx"], cc)
            driver = _driver_usage(compiled, cc)
            if driver is not None:
                regs, spills = driver
            results.append({
                "case": case, "cc": cc, "kernel": fn.__name__, "constexprs": cx, "cubin_bytes": len(cubin),
                "elf": bytes(cubin[:4]) == b"\x7fELF", "n_regs": regs, "n_spills": spills,
                "num_warps": compiled.metadata.num_warps, "from_driver": driver is not None,
                "fma": len(re.findall(r"\bfma\.", compiled.asm["ptx"])),
                "f32_div": sorted(set(re.findall(r"\bdiv\.[a-z.]*f32\b", compiled.asm["ptx"]))),
            })
    print(_MARK + json.dumps(results))


# --------------------------------------------------------------------------------------------
# Tests (parent process; TRITON_INTERPRET may be set here)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aot_results():
    pytest.importorskip("triton")
    from helpers import run_worker

    raw = run_worker(Path(__file__), _MARK, ROOT)
    results = {(r["case"], r["cc"]): r for r in raw}
    print()
    print(f"{'case':<24} {'kernel':<22} {'cc':>3} {'warps':>5} {'n_regs':>6} {'n_spills':>8}  constexprs")
    for (case, cc), r in sorted(results.items()):
        print(f"{case:<24} {r['kernel']:<22} {cc:>3} {r['num_warps']:>5} {r['n_regs']:>6} {r['n_spills']:>8}  {r['constexprs']}")
    return results


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_aot_cubin_without_spills(aot_results, case, cc):
    r = aot_results[(case, cc)]
    print(f"{case} sm_{cc}: {r['kernel']} n_regs={r['n_regs']} n_spills={r['n_spills']}")
    assert r["cubin_bytes"] > 0 and r["elf"], f"{case} sm_{cc}: no cubin"
    assert r["n_regs"] <= 255
    assert r["n_spills"] == 0, f"{case} sm_{cc}: {r['n_spills']} bytes of register spills"


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("case", EXACT_FLOAT_CASES)
def test_aot_no_contracted_or_approximate_float_ops(aot_results, case, cc):
    # Bitwise equality with rowmath.py needs one rounding per op: no FMA (enable_fp_fusion=False at
    # launch) and IEEE division only (tl.math.div_rn; "/" on float32 compiles to div.full.f32).
    r = aot_results[(case, cc)]
    assert r["fma"] == 0, f"{case} sm_{cc}: {r['fma']} fma instructions in the PTX"
    assert r["f32_div"] and set(r["f32_div"]) <= {"div.rn.f32"}, f"{case} sm_{cc}: divisions {r['f32_div']}"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
