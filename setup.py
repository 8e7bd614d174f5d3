"""Builds the `mnn_fast._C` extension from csrc/ (CPU always; CUDA when usable or FORCE_CUDA=1), and
`mnn_fast._serving` from csrc/python/ (the serving path's direct entries into the ops, kept out of
_C because they need libtorch_python, which C++ programs loading _C do not have).

Packages are discovered, not listed: every package under mnn_fast/, and kernels/ (the Triton kernels)
as `mnn_fast.kernels`. The version comes from mnn_fast/_version.py (pyproject.toml).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if os.environ.get("MNN_FAST_NO_CUDA", "0") == "1":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and CUDA_HOME is not None


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # -ffp-contract=off: the row arithmetic (csrc/rowmath.h) must round every + and * on its own,
    # also when CFLAGS add -march=native (which brings FMA). -fno-trapping-math changes no result
    # (only whether FP exception flags may be raised speculatively); without it GCC will not
    # vectorise the row loops, whose float-to-int conversions it must otherwise keep conditional.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    serving = CppExtension("mnn_fast._serving", rel(glob.glob(os.path.join(ROOT, "csrc", "python", "*.cpp"))),
                           extra_compile_args={"cxx": ["-O3", "-std=c++20"]})
    if _want_cuda():
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        return [
            CUDAExtension(
                "mnn_fast._C",
                sources,
                define_macros=[("MNN_FAST_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--fmad=false"]},
                extra_link_args=["-fopenmp"],
            ),
            serving,
        ]
    return [CppExtension("mnn_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]), serving]


def _packages():
    """mnn_fast and every package below it, plus kernels/ (and any package below it) as mnn_fast.kernels."""
    kernels = ["mnn_fast.kernels"] + [f"mnn_fast.kernels.{p}" for p in find_packages(os.path.join(ROOT, "kernels"))]
    return find_packages(ROOT, include=["mnn_fast", "mnn_fast.*"]) + kernels


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=_packages(),
    package_dir={"mnn_fast.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
