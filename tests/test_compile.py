"""torch.compile(fullgraph=True) traces the module with zero graph breaks and matches eager."""
import pytest
import torch

from models import cnn_mnn, mlp_mnn
from mnn_fast import MetaNeuralNetwork

COMPILE_BACKENDS = ["cpp", "triton"]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fullgraph_compile_matches_eager(backend, kind):
    torch._dynamo.reset()
    if kind == "mlp":
        switch, specialists = mlp_mnn(6, seed=7)
        shape = (24,)
    else:
        switch, specialists = cnn_mnn(4, seed=7)
        shape = (3, 8, 8)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.1, backend=backend)
    # auto picks segment_linear for the MLP stack and runs the CNNs one by one: both paths compile.
    assert mnn.executor == ("grouped" if kind == "mlp" else "sequential")
    compiled = torch.compile(mnn, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in (37, 64):  # a second size must reuse the dynamic graph, not break
            x = torch.randn(batch, *shape)
            eager = mnn(x)
            got = compiled(x)
            torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
            assert torch.equal(got.argmax(1), eager.argmax(1))
    explanation = torch._dynamo.explain(mnn)(torch.randn(16, *shape))
    assert explanation.graph_break_count == 0
