#!/usr/bin/env bash
# The package as a user gets it: sdist from the tree, wheel from that sdist, installed into a fresh
# venv outside the repository, then exercised from a directory that does not contain the repository.
# `make check-package` runs it (after `make install`); .ci/run runs it after `make test`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD_PY="$ROOT/.venv/bin/python"   # has torch, setuptools and build: the extension's build needs torch
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mnn_fast_package.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
step() { printf '\n== %s (%ds)\n' "$1" "$SECONDS"; }

step "sdist from the tree, then the wheel from the sdist (python -m build)"
# No flags: build makes the sdist, unpacks it and builds the wheel from it, not from the tree.
# --no-isolation: the extension must compile against the pinned torch of this venv.
"$BUILD_PY" -m build --no-isolation --outdir "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/*.tar.gz)
WHEEL=$(ls "$WORK"/dist/*.whl)
echo "built: $(basename "$SDIST") $(basename "$WHEEL")"

step "the archives hold every package and source of the tree"
"$BUILD_PY" "$ROOT/.ci/package_contents.py" "$ROOT" "$SDIST" "$WHEEL"

step "a fresh venv outside the repository: pinned torch, then the wheel"
python3 -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v '^WARNING: Location' || true
"$VPY" -m pip install -q "$WHEEL" 2>&1 | grep -v '^WARNING: Location' || true
"$VPY" -c 'import mnn_fast' || { echo "the wheel did not install"; exit 1; }

step "the installed command and package, run from outside the repository"
mkdir "$WORK/user" && cd "$WORK/user"
export PATH="$WORK/venv/bin:$PATH"
unset PYTHONPATH
mnn-fast --version
"$VPY" "$ROOT/.ci/package_smoke.py" "$ROOT" "$WORK/venv"
mnn-fast train run --dataset digits --model mlp --switch-epochs 1 --specialist-epochs 1 > train.log 2>&1 \
  || { cat train.log; exit 1; }
mnn-fast eval run | tee eval.log
grep -q "^MNN at test threshold 0.25: 0\.[0-9]" eval.log
step "package check passed"
