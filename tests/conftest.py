"""Shared test setup: Triton runs under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before Triton decorates any kernel, hence here, before imports.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: a second intra-op thread per worker only contends (small models ran
    # 4-17x slower so). Tests that claim something at a thread count set it themselves (`threads`).
    torch.set_num_threads(1)

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "mnn",
    deadline=None,
    derandomize=True,  # CI must be reproducible; the seed-free search still covers many shapes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("mnn")


# Every CPU backend is required here: a missing build must fail the suite, not skip it.
CPU_BACKENDS = ("torch", "cpp", "triton")


@pytest.fixture(scope="session")
def serial(tmp_path_factory):
    """The launcher tests' reference (tests/launch): the specialists' file bytes of the tiny digits
    run trained serially (``workers=1``), trained once per session."""
    from helpers import TINY_RUN, specialist_bytes
    from mnn_fast.training import TrainConfig, train

    run_dir = tmp_path_factory.mktemp("serial") / "run"
    train(TrainConfig(**TINY_RUN), run_dir)
    return specialist_bytes(run_dir)


@pytest.fixture
def threads(request):
    """Intra-op thread count for one test (``parametrize("threads", [...], indirect=True)``): kernels
    split work by it, and a bitwise or tolerance claim must hold at any count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A trained digits run (one-epoch MLPs on 30% of digits: ten distinct specialists, a few seconds),
    trained once per session for the sharded-loading and predict tests. It lives here, not in a
    tests/distributed/conftest.py, because test modules import this file as ``conftest``."""
    from mnn_fast.training import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_digits_run") / "run"
    train(TrainConfig(dataset="digits", model="mlp", switch_epochs=1, specialist_epochs=1, train_fraction=0.3), root)
    return root
