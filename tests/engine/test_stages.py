"""The public stages compose into the module's forward, bitwise; each keeps its documented shapes.

Reference first: ``naive_forward`` (the paper's loop). A caller driving the stages by hand (as the
sweep does) must get exactly the module's output.
"""
import pytest
import torch

from conftest import CPU_BACKENDS
from models import mlp_mnn
from mnn_fast import MetaNeuralNetwork
from mnn_fast.engine import stages
from mnn_fast.engine.backends import get_backend
from mnn_fast.engine.contributions import class_tables, specialist_contributions
from mnn_fast.reference import naive_forward


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("groups", [None, [[0, 1], [2], [3, 4, 5]]])
def test_stages_by_hand_equal_the_module_and_the_naive_loop(backend, groups):
    switch, specialists = mlp_mnn(6, 3 if groups else 6, seed=4)
    mnn = MetaNeuralNetwork(switch, specialists, groups=groups, threshold=0.1, num_classes=6, backend=backend).eval()
    ops = get_backend(backend)
    x = torch.randn(90, 24)
    with torch.no_grad():
        z = switch(x)
        if groups is None:
            logp, scores = stages.switch_scores(z, ops)
        else:
            logp, scores = stages.switch_scores(z, ops, mnn.group_offsets, mnn.group_classes)
        assert logp.shape == (90, 6) and scores.shape == (90, mnn.num_experts)
        routing = stages.route_batch(scores, ops, 0.1, None)
        xg = stages.gather_rows(x, routing.perm, ops)
        assert xg.shape == (routing.perm.numel(), 24)
        sizes = routing.counts.tolist()
        outputs = stages.run_specialists(specialists, xg, routing.counts, sizes)
        stages.check_specialist_output(outputs, xg, mnn.groups, 6)
        tables = class_tables(mnn.groups, 6, x.device)
        got = stages.recombine_log_probs(logp, outputs, routing, tables, ops)
        # The unfused path (contributions, then combine, then log_softmax_rows) is the same arithmetic.
        logv = specialist_contributions(outputs, routing.offsets, tables, ops)
        assert torch.equal(stages.combine_log_probs(logp, logv, routing, ops), got)
        assert torch.equal(got, mnn(x))
        assert torch.equal(got, naive_forward(switch, specialists, x, groups=groups, threshold=0.1))


def test_empty_batch_flows_through_every_stage():
    # B = 0: every stage must keep its shapes with zero rows (no expert is called).
    switch, specialists = mlp_mnn(4, seed=0)
    ops = get_backend("cpp")
    x = torch.randn(0, 24)
    logp, scores = stages.switch_scores(switch(x), ops)
    routing = stages.route_batch(scores, ops, 0.2, None)
    xg = stages.gather_rows(x, routing.perm, ops)
    outputs = stages.run_specialists(specialists, xg, routing.counts, routing.counts.tolist())
    assert outputs == [None] * 4 and xg.shape == (0, 24)
    tables = class_tables([[c] for c in range(4)], 4, x.device)
    logv = specialist_contributions(outputs, routing.offsets, tables, ops)
    assert logv.shape == (0, 4)
    assert stages.recombine_log_probs(logp, outputs, routing, tables, ops).shape == (0, 4)


def test_no_active_expert_returns_the_switch_distribution():
    logits = torch.randn(5, 3)
    ops = get_backend("cpp")
    logp, scores = stages.switch_scores(logits, ops)
    routing = stages.route_batch(scores, ops, 1.0, None)  # t = 1 activates nothing
    assert routing.perm.numel() == 0
    out = stages.recombine_log_probs(logp, [None] * 3, routing, class_tables([[0], [1], [2]], 3, logits.device), ops)
    # The switch side is the backend's one-pass op, the same one the naive loop calls.
    assert torch.equal(logp, ops.softmax_rows(logits)[0]) and torch.equal(scores, ops.softmax_rows(logits)[1])
    assert torch.equal(out, ops.log_softmax_rows(logp))
    torch.testing.assert_close(out, torch.log_softmax(logits, 1), rtol=0, atol=1e-6)


def test_route_batch_checks_the_switch_fn_mask():
    ops = get_backend("cpp")
    scores = torch.rand(4, 3)
    with pytest.raises(ValueError, match="switch_fn must return a bool tensor of shape"):
        stages.route_batch(scores, ops, None, None, switch_fn=lambda s: s)  # a float mask
    r = stages.route_batch(scores, ops, None, None, switch_fn=lambda s: torch.ones_like(s, dtype=torch.bool))
    assert r.counts.tolist() == [4, 4, 4]
