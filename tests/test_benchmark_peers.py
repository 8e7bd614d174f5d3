"""The grouped-GEMM peers of the end-to-end benchmark compute what ``segment_linear`` computes.

Reference at the top: ``mnn_fast::segment_linear`` (bitwise ``nn.Linear`` per expert). The peers
(``torch._grouped_mm`` plus a per-row bias, a padded ``baddbmm``) are timed beside the grouped
executor, so a peer that computed something else would make the comparison meaningless.
"""
from __future__ import annotations

import pytest
import torch

from mnn_fast.benchmark import PEERS, end_to_end_impls, end_to_end_workload


def reference(x, weight, bias, offsets):
    return torch.ops.mnn_fast.segment_linear(x, weight, bias, offsets, False)


# Empty experts (first, middle, last) and one expert with every row are where the padded and
# offset-based forms index differently; E=1 is the degenerate grouping.
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 4, 0], [7], [0, 0, 6], [2, 2, 2, 0]])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peer_is_segment_linear(peer, counts, with_bias):
    gen = torch.Generator().manual_seed(len(counts) + sum(counts))
    experts, n = len(counts), sum(counts)
    # Widths of 16-byte multiples: torch._grouped_mm refuses other strides.
    x = torch.randn(n, 8, generator=gen)
    weight = torch.randn(experts, 4, 8, generator=gen)
    bias = torch.randn(experts, 4, generator=gen) if with_bias else None
    offsets = torch.tensor([0, *counts]).cumsum(0)
    got = PEERS[peer](x, weight, bias, offsets)
    torch.testing.assert_close(got, reference(x, weight, bias, offsets), rtol=1e-5, atol=1e-5)


def test_end_to_end_offers_the_peers_for_linear_stacks_only():
    mlp = end_to_end_workload("mlp", 4, 32, width=16)
    impls = end_to_end_impls(mlp, executors=("sequential", "grouped"))
    with torch.no_grad():
        want = impls["engine_sequential"]()
        for peer in PEERS:
            torch.testing.assert_close(impls[peer](), want, rtol=1e-5, atol=1e-5)
    cnn = end_to_end_workload("resnet20", 10, 4)
    assert not set(PEERS) & set(end_to_end_impls(cnn, executors=("sequential", "grouped")))
