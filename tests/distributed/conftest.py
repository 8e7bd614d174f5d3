"""The tiny trained digits run the sharded-loading and predict tests share (trained once per session)."""
import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One-epoch MLPs on 30% of digits: ten distinct specialists, trained in a few seconds."""
    from mnn_fast.training import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_digits_run") / "run"
    train(TrainConfig(dataset="digits", model="mlp", switch_epochs=1, specialist_epochs=1, train_fraction=0.3), root)
    return root
