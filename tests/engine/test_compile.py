"""mnn_fast.compile(fullgraph=True) traces the module with zero graph breaks and matches eager;
the settings it needs stay scoped to its own calls."""
import subprocess
import sys

import pytest
import torch

import mnn_fast
from models import cnn_mnn, mlp_mnn
from mnn_fast import MetaNeuralNetwork
from mnn_fast.engine.compile import COMPILE_SETTINGS, compile_settings

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
    # auto picks segment_linear for the MLP stack (the cpp backend has it, triton has none) and runs
    # the CNNs one by one: both paths compile.
    assert mnn.executor == ("grouped" if kind == "mlp" and backend == "cpp" else "sequential")
    compiled = mnn_fast.compile(mnn, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in (37, 64):  # a second size must reuse the dynamic graph, not break
            x = torch.randn(batch, *shape)
            eager = mnn(x)
            got = compiled(x)
            torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
            assert torch.equal(got.argmax(1), eager.argmax(1))
    with compile_settings():
        explanation = torch._dynamo.explain(mnn)(torch.randn(16, *shape))
    assert explanation.graph_break_count == 0


def _global_settings():
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    return ({k: getattr(dynamo_config, k) for k in COMPILE_SETTINGS["dynamo"]},
            {k: getattr(inductor_config, k) for k in COMPILE_SETTINGS["inductor"]})


def test_import_changes_no_global_torch_setting():
    # A fresh interpreter: the settings torch has before and after `import mnn_fast` must be equal.
    code = ("import torch, torch._dynamo.config as d, torch._inductor.config as i\n"
            "before = (d.capture_scalar_outputs, d.capture_dynamic_output_shape_ops, i.layout_optimization)\n"
            "import mnn_fast\n"
            "after = (d.capture_scalar_outputs, d.capture_dynamic_output_shape_ops, i.layout_optimization)\n"
            "print(before == after, before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("True"), out


def test_compiled_calls_restore_the_settings_afterwards():
    before = _global_settings()
    switch, specialists = mlp_mnn(4, seed=1)
    compiled = mnn_fast.compile(MetaNeuralNetwork(switch, specialists, threshold=0.1), fullgraph=True)
    with torch.no_grad():
        compiled(torch.randn(8, 24))
    assert _global_settings() == before
    with compile_settings():
        assert _global_settings() == (COMPILE_SETTINGS["dynamo"], COMPILE_SETTINGS["inductor"])


def test_compiled_module_state_holds_each_tensor_once():
    switch, specialists = mlp_mnn(4, seed=1)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.1)
    compiled = mnn_fast.compile(mnn)
    assert list(compiled.state_dict()) == [f"module.{k}" for k in mnn.state_dict()]
