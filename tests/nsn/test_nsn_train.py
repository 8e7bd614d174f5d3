"""NSN training: the gradient pairing against a hand-computed case, the paper's momentum, and the
sub-model invariant after every step.

Reference: for a base with one hidden layer (n = 1), sub-model 0 is softmax regression on the output
layer L_1 and sub-model 1 is L_0 -> ReLU -> L_1. The rule: grad(L_1) = mean of both sub-models'
gradients of L_1; grad(L_0) = the base's own. Cross-entropy gradients written out below.
"""
import torch
from torch import nn

from mnn_fast.nsn import DetachableMLP, PaperMomentum, paired_gradients, train_detachable


def softmax_ce_grad(logits, y):
    """d mean CE / d logits = (softmax - onehot) / B."""
    return (torch.softmax(logits, 1) - nn.functional.one_hot(y, logits.shape[1]).float()) / len(y)


def test_pairing_matches_the_hand_computed_gradients():
    torch.manual_seed(0)
    model = DetachableMLP(3, 2, depth=1)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    w0, b0, w1, b1 = (p.detach() for p in (model.hidden[0].weight, model.hidden[0].bias,
                                           model.output.weight, model.output.bias))
    # Sub-model 0: logits = x W1^T + b1.
    d0 = softmax_ce_grad(x @ w1.T + b1, y)
    g0_w1, g0_b1 = d0.T @ x, d0.sum(0)
    # Sub-model 1: h = relu(x W0^T + b0), logits = h W1^T + b1.
    pre = x @ w0.T + b0
    h = pre.clamp_min(0)
    d1 = softmax_ce_grad(h @ w1.T + b1, y)
    g1_w1, g1_b1 = d1.T @ h, d1.sum(0)
    dh = (d1 @ w1) * (pre > 0).float()
    g1_w0, g1_b0 = dh.T @ x, dh.sum(0)

    paired_gradients(model, x, y)
    torch.testing.assert_close(model.output.weight.grad, (g0_w1 + g1_w1) / 2)
    torch.testing.assert_close(model.output.bias.grad, (g0_b1 + g1_b1) / 2)
    torch.testing.assert_close(model.hidden[0].weight.grad, g1_w0)
    torch.testing.assert_close(model.hidden[0].bias.grad, g1_b0)


def test_pairing_for_a_deeper_base_uses_the_two_smallest_holders():
    # n = 3: L_3 <- (0, 1), L_2 <- (1, 2), L_1 <- (2, 3), L_0 <- 3 alone; checked with autograd per sub-model.
    torch.manual_seed(1)
    model = DetachableMLP(4, 3, depth=3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    layers = model.layers()
    own = []
    for k in range(4):
        loss = nn.functional.cross_entropy(model(x, depth=k), y)
        own.append(dict(zip(layers, [None] * 4)))
        held = layers[3 - k:]
        grads = torch.autograd.grad(loss, [layer.weight for layer in held])
        for layer, g in zip(held, grads):
            own[k][layer] = g
    paired_gradients(model, x, y)
    for j, layer in enumerate(layers):
        pair = [k for k in (3 - j, 4 - j) if k <= 3]
        want = sum(own[k][layer] for k in pair) / len(pair)
        torch.testing.assert_close(layer.weight.grad, want)


def test_paper_momentum_format():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = PaperMomentum([p], lr=0.5, momentum=0.9)
    for g, v_want in ((torch.tensor([1.0, 1.0]), 0.1), (torch.tensor([1.0, 1.0]), 0.19)):
        p.grad = g
        before = p.detach().clone()
        opt.step()
        # V starts at 0: V1 = 0.1 G, V2 = 0.9 * 0.1 + 0.1 = 0.19; W <- W - lr V.
        torch.testing.assert_close(p.detach(), before - 0.5 * v_want * g)


def test_sub_models_stay_the_bases_last_layers_after_every_step():
    torch.manual_seed(2)
    model = DetachableMLP(5, 3, depth=2)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    opt = PaperMomentum(model.parameters(), lr=0.3, weight_decay=1e-4)
    for step in range(3):
        paired_gradients(model, x, y)
        opt.step()
        for removed in range(3):
            detached = [m for m in model.detach_layers(removed) if isinstance(m, nn.Linear)]
            for got, want in zip(detached, model.layers()[removed:]):
                assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)


def test_training_learns_every_depth_and_keeps_the_best_validation_epoch():
    torch.manual_seed(3)
    centres = torch.randn(3, 6) * 3
    y = torch.randint(0, 3, (300,))
    x = centres[y] + torch.randn(300, 6) * 0.5
    result = train_detachable(DetachableMLP(6, 3, depth=2), x[:240], y[:240], x[240:], y[240:], epochs=5, lr=0.3)
    assert 1 <= result.best_epoch <= 5 and sorted(result.val_accuracy) == [0, 1, 2]
    assert all(acc > 0.9 for acc in result.val_accuracy.values())  # separable blobs: every depth learns
