"""Test-threshold sweeps: the sweep predicts exactly what the module predicts at each threshold.

Reference first: the module itself, evaluated threshold by threshold; the sweep runs each specialist
once at the lowest threshold and must give the same predictions (labels = the module's outputs).
"""
import dataclasses

import pytest
import torch

from mnn_fast import MetaNeuralNetwork
from mnn_fast.engine.backends import get_backend
from mnn_fast.training.sweep import log_softmax_argmax, sweep_test_thresholds


# Overlapping groups, binary and width-C specialists, top-k and unsorted/duplicate thresholds: the
# cases where "filter the widest routing" could differ from routing afresh at each threshold.
# A lowest threshold of 0 routes every sample to every expert; 0.1 leaves samples with different
# row counts (the padded-grid path), and 101 thresholds is a fine sweep.
@pytest.mark.parametrize("thresholds", [[0.3, 0.0, 0.05, 0.3, 0.6, 1.0], [0.4, 0.1, 0.2, 0.1],
                                        [round(0.01 * i, 2) for i in range(101)]])
@pytest.mark.parametrize("top_k", [None, 2])
def test_sweep_predicts_what_the_module_predicts(top_k, thresholds):
    torch.manual_seed(0)
    C, groups = 6, [[0, 1], [1, 2, 3], [4], [5, 0]]
    switch = torch.nn.Linear(5, C)
    experts = [torch.nn.Linear(5, 1 if len(g) == 1 else C) for g in groups]
    mnn = MetaNeuralNetwork(switch, experts, groups=groups, threshold=0.0, top_k=top_k).eval()
    x = torch.randn(300, 5)
    for t in thresholds[::10] if len(thresholds) > 20 else thresholds:  # one sweep per checked t
        mnn.threshold = t
        with torch.no_grad():
            pred, routing = mnn(x, return_routing=True)
        # Labels = the module's own predictions at t: the sweep must score exactly 1.0 there.
        (row,) = [r for r in sweep_test_thresholds(mnn, x, pred.argmax(1), thresholds, batch_size=128)
                  if r["test_threshold"] == t][:1]
        assert row["accuracy"] == 1.0
        assert row["experts_per_sample"] == routing.perm.numel() / len(x)


def test_sweep_refuses_a_switch_fn_module():
    mnn = MetaNeuralNetwork(torch.nn.Linear(5, 3), [torch.nn.Linear(5, 3) for _ in range(3)],
                            switch_fn=lambda scores: scores > 0.5)
    with pytest.raises(ValueError, match="switch_fn"):
        sweep_test_thresholds(mnn, torch.randn(4, 5), torch.zeros(4, dtype=torch.long), [0.1])


# A combine that enforces the CUDA kernel's contract: one sample_rows entry per logv row.
def test_sweep_respects_the_combine_contract():
    torch.manual_seed(0)
    ops = get_backend("cpp")
    inner = ops.combine

    def strict(logp, logv, perm, sample_offsets, sample_rows):
        assert sample_rows.numel() == logv.shape[0] == perm.numel()
        return inner(logp, logv, perm, sample_offsets, sample_rows)

    mnn = MetaNeuralNetwork(torch.nn.Linear(5, 4), [torch.nn.Linear(5, 4) for _ in range(4)],
                            backend=dataclasses.replace(ops, combine=strict)).eval()
    x = torch.randn(60, 5)
    rows = sweep_test_thresholds(mnn, x, torch.zeros(60, dtype=torch.long), [0.0, 0.2, 0.3])
    assert rows[0]["experts_per_sample"] == 4.0


# Rows built to break a plain argmax: exact ties, values a rounding apart, NaN and infinities, and
# large magnitudes where log_softmax's subtraction rounds distinct logits together.
def test_log_softmax_argmax_is_bitwise_torch():
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(4000, 7, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e4])[torch.arange(4000) % 4, None]
    acc[::5, 3] = acc[::5, 5]  # exact ties
    acc[1::5, 2] = torch.nextafter(acc[1::5, 4], torch.tensor(float("inf")))  # one ulp apart
    acc[2::50, 1] = float("nan")
    acc[3::50, 0] = float("inf")
    acc[4::50] = float("-inf")
    big = torch.full((3, 7), 3e7)
    big[:, 5] += 2.0  # distinct in float32, equal after subtracting log-sum-exp
    acc = torch.cat([acc, big, acc.new_empty(0, 7)])
    assert torch.equal(log_softmax_argmax(acc), torch.log_softmax(acc, 1).argmax(1))
    assert log_softmax_argmax(acc.new_empty(0, 7)).shape == (0,)
