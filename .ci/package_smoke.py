"""The installed package, as a user imports it: run by the fresh venv's Python outside the repository.

Usage: package_smoke.py ROOT VENV. Checks that mnn_fast comes from VENV (not the tree), that every
sub-command's --help works through the installed entry point, that a forward equals the paper's loop
bit for bit, and that the Triton kernels import as mnn_fast.kernels.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

root, venv = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
import mnn_fast  # noqa: E402
from mnn_fast.cli import build_parser  # noqa: E402

where = Path(mnn_fast.__file__).resolve()
assert venv in where.parents and root not in where.parents, f"mnn_fast imported from {where}"
assert not Path.cwd().resolve().is_relative_to(root), "run from outside the repository"

from importlib.metadata import version  # noqa: E402

assert version("mnn_fast") == mnn_fast.__version__, (version("mnn_fast"), mnn_fast.__version__)

subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
for command in subparsers.choices:
    out = subprocess.run(["mnn-fast", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: mnn-fast {command}"), (command, out.stderr)
print(f"--help works for all {len(subparsers.choices)} sub-commands: {', '.join(subparsers.choices)}")

torch.manual_seed(0)
switch = nn.Sequential(nn.Linear(13, 5))
specialists = [nn.Sequential(nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 5)) for _ in range(5)]
mnn = mnn_fast.MetaNeuralNetwork(switch, specialists, threshold=0.1).eval()
x = torch.randn(33, 13)
with torch.no_grad():
    got = mnn(x)
    want = mnn_fast.reference.naive_forward(switch, specialists, x, threshold=0.1)
assert torch.equal(got, want), "the installed module differs from naive_forward"
assert mnn_fast.backend_status("cpu")["cpp"] is None, "the installed wheel's C++ backend is unusable"
print("forward == naive_forward, bitwise (cpp backend)")

os.environ.setdefault("TRITON_INTERPRET", "1")
import mnn_fast.kernels  # noqa: E402

assert Path(mnn_fast.kernels.__file__).resolve().is_relative_to(venv)
print(f"mnn_fast.kernels imports: {', '.join(sorted(n for n in mnn_fast.kernels.__all__))}")
