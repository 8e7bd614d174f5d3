"""mnn_fast.compile(fullgraph=True) traces the module with zero graph breaks and matches eager;
the settings it needs stay scoped to its own calls."""
import subprocess
import sys
import threading

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


def _graph_input_counter():
    """A torch.compile backend that runs the traced graph as is and records its input count."""
    seen = []

    def backend(gm, example_inputs):
        seen.append(sum(node.op == "placeholder" for node in gm.graph.nodes))
        return gm.forward

    return backend, seen


def test_grouped_graph_inputs_do_not_grow_with_the_experts():
    # Stacking E parameters per layer inside the graph made compile time grow with E (issue 13):
    # the held stacks enter as one input per layer, so E=4 and E=16 trace graphs of one size.
    counts = []
    for experts in (4, 16):
        torch._dynamo.reset()
        switch, specialists = mlp_mnn(experts, seed=3)
        mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
        assert mnn.executor == "grouped"
        backend, seen = _graph_input_counter()
        with torch.no_grad():
            x = torch.randn(32, 24)
            torch.testing.assert_close(mnn_fast.compile(mnn, backend=backend, fullgraph=True)(x), mnn(x),
                                       atol=1e-5, rtol=1e-5)
        assert len(seen) == 1
        counts.append(seen[0])
    assert counts[0] == counts[1], counts


def test_compiled_grouped_module_sees_weight_updates_without_recompiling():
    # The held stacks are refreshed eagerly before each compiled call: an in-place update (an
    # optimizer step) must reach the next call, through the same graph.
    torch._dynamo.reset()
    switch, specialists = mlp_mnn(5, seed=4)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = mnn_fast.compile(mnn, backend=counter, fullgraph=True)
    x = torch.randn(40, 24)
    with torch.no_grad():
        before = compiled(x)
        for s in specialists:
            s[-1].weight.mul_(-2.0)
        after = compiled(x)
        assert not torch.equal(before, after)
        assert torch.equal(after, mnn(x))  # the eager backend runs the traced ops themselves
    assert counter.frame_count == 1
    assert not mnn._grouped.stacks_held  # released after each call


@pytest.mark.parametrize("widths", [None, [4, 1, 4, 1]], ids=["grouped", "binary_mix"])
def test_compiled_module_trains_its_experts(widths):
    # With autograd on nothing is held: the graph stacks the parameters so gradients reach them.
    # Inductor also traces the backward, whose formulas must not slice per expert (data-dependent
    # counts): recombine's (grouped) and the contributions op's (binary + width-C specialists).
    torch._dynamo.reset()
    switch, specialists = mlp_mnn(4, seed=5, widths=widths)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    assert mnn.executor == ("grouped" if widths is None else "sequential")
    compiled = mnn_fast.compile(mnn, fullgraph=True)
    x = torch.randn(32, 24)
    compiled(x).logsumexp(1).sum().backward()
    grads = [s[0].weight.grad for s in specialists]
    mnn.zero_grad()
    mnn(x).logsumexp(1).sum().backward()
    for got, (e, s) in zip(grads, enumerate(specialists)):
        assert got is not None, f"specialists[{e}] got no gradient"
        torch.testing.assert_close(got, s[0].weight.grad, atol=1e-5, rtol=1e-5)


def test_held_stacks_nest_and_release():
    # Two overlapping calls (threads of a server) each hold the stacks; the first to finish must
    # not release them under the other.
    switch, specialists = mlp_mnn(3, seed=6)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    with torch.no_grad():
        with mnn.weights_stacked_for_compiled_calls():
            with mnn.weights_stacked_for_compiled_calls():
                assert mnn._grouped.stacks_held
            assert mnn._grouped.stacks_held
        assert not mnn._grouped.stacks_held
    with mnn.weights_stacked_for_compiled_calls():  # autograd on: nothing held
        assert not mnn._grouped.stacks_held


def test_held_stacks_belong_to_the_holding_thread():
    # A compiled call from another thread that did not refresh the stacks must not be told they are
    # fresh: the weights may have changed since this thread's refresh.
    switch, specialists = mlp_mnn(3, seed=6)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    seen = []
    with torch.no_grad(), mnn.weights_stacked_for_compiled_calls():
        worker = threading.Thread(target=lambda: seen.append(mnn._grouped.stacks_held))
        worker.start()
        worker.join()
        assert mnn._grouped.stacks_held
    assert seen == [False]
