"""The gather workspace (issue 12): reused across inference calls, grown to the largest batch,
released on request, never used where autograd could keep the gathered rows, one per thread.

The sequential executor gathers into the workspace when a row's bytes are a multiple of the fresh
alignment (every segment of the buffer then starts aligned); otherwise each expert gets its rows as
a fresh tensor (``gather_split``), tested at the bottom."""
import copy
import threading

import torch
from torch import nn

from models import mlp_mnn
from mnn_fast import MetaNeuralNetwork
from mnn_fast.reference import naive_forward


FEATURES = 32  # 128-byte rows: the workspace path (24 features, 96 bytes, would take gather_split)


def _module(features=FEATURES):
    switch, specialists = mlp_mnn(5, d_in=features, seed=2)
    return MetaNeuralNetwork(switch, specialists, threshold=0.1, executor="sequential"), switch, specialists


def test_workspace_is_reused_and_grows_to_the_high_water_mark():
    mnn, switch, specialists = _module()
    with torch.no_grad():
        for batch in (64, 32, 200, 100):
            x = torch.randn(batch, FEATURES)
            out, routing = mnn(x, return_routing=True)
            assert torch.equal(out, naive_forward(switch, specialists, x, threshold=0.1))
            if batch == 200:
                high = mnn.workspace_bytes
                assert high >= routing.perm.numel() * FEATURES * 4
    assert mnn.workspace_bytes == high  # smaller batches reuse the buffer; it never shrinks
    assert copy.deepcopy(mnn).workspace_bytes == 0  # copies leave the scratch behind
    mnn.release_workspace()
    assert mnn.workspace_bytes == 0


def test_no_workspace_while_autograd_records():
    mnn, _, specialists = _module()
    x = torch.randn(40, FEATURES)
    mnn(x).sum().backward()  # parameters require grad: the gathered rows may be saved for backward
    assert mnn.workspace_bytes == 0
    assert specialists[0][0].weight.grad is not None


def test_identity_experts_reading_the_workspace_in_place():
    # Identity specialists return views of the gathered rows: recombine reads them in place, and a
    # second call (which overwrites the workspace) must not change the first call's output.
    # 16 classes: 64-byte rows, so the rows are gathered into the workspace.
    experts = [nn.Identity() for _ in range(16)]
    mnn = MetaNeuralNetwork(nn.Identity(), experts, threshold=0.1)
    x1, x2 = torch.randn(300, 16) * 4, torch.randn(300, 16) * 4
    with torch.no_grad():
        first = mnn(x1)
        kept = first.clone()
        assert mnn.workspace_bytes > 0
        mnn(x2)
    assert torch.equal(first, kept)
    assert torch.equal(first, naive_forward(nn.Identity(), experts, x1, threshold=0.1))


def test_each_thread_has_its_own_workspace():
    mnn, switch, specialists = _module()
    inputs = [torch.randn(150, FEATURES) for _ in range(4)]
    results = {}

    def run(k):
        with torch.no_grad():
            for _ in range(5):
                results[k] = mnn(inputs[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, x in enumerate(inputs):
        assert torch.equal(results[k], naive_forward(switch, specialists, x, threshold=0.1))


def test_rows_of_odd_bytes_go_to_each_expert_fresh(monkeypatch):
    # 24 features (96-byte rows): most segments of one buffer would start off the 64-byte boundary
    # and need a realigning copy, so each expert gets a fresh tensor of its rows instead.
    mnn, switch, specialists = _module(features=24)
    calls = []
    for expert in specialists:
        expert.register_forward_pre_hook(lambda module, args: calls.append(args[0]))
    x = torch.randn(120, 24)
    with torch.no_grad():
        out, routing = mnn(x, return_routing=True)
    seen = list(calls)  # the naive loop below calls the same hooked specialists
    assert torch.equal(out, naive_forward(switch, specialists, x, threshold=0.1))
    assert mnn.workspace_bytes == 0  # no shared buffer was needed
    bounds = routing.offsets.tolist()
    rows = [x[routing.perm[a:b]] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    assert len(seen) == len(rows)
    for got, want in zip(seen, rows):
        assert torch.equal(got, want) and got.is_contiguous() and got.data_ptr() % 64 == 0
    assert len({t.data_ptr() for t in seen}) == len(seen)  # one allocation each, never shared
