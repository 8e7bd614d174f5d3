"""Plain torch.compile(mnn), with or without fullgraph, and mnn_fast.compile each trace the module as
one graph and match eager; the grouped weights enter the graph stacked (inputs flat in E) and follow
weight updates; mnn_fast.compile's settings stay scoped to its own calls."""
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

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


# ------------------------------------------------------------------ plain torch.compile(mnn)

# The three calls a user may type; each must give one graph.
CALLS = {
    "plain": lambda module, **kw: torch.compile(module, **kw),
    "fullgraph": lambda module, **kw: torch.compile(module, fullgraph=True, **kw),
    "mnn_fast.compile": lambda module, **kw: mnn_fast.compile(module, fullgraph=True, **kw),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_each_call_traces_one_graph(call, grad):
    # inference: the grouped executor on held stacks, routing sized by the ops' fake kernels;
    # autograd: the experts one by one on sizes from mnn_fast::expert_sizes (no .tolist() in the graph).
    torch._dynamo.reset()
    switch, specialists = mlp_mnn(6, seed=7)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.1)
    counter = CompileCounter()
    compiled = CALLS[call](mnn, backend=counter, dynamic=True)
    with torch.set_grad_enabled(grad):
        for batch in (3, 5, 7):  # dynamic=True: one graph for every batch size
            x = torch.randn(batch, 24)
            got, eager = compiled(x), mnn(x)
            if grad:  # each expert runs on its rows plus a padding row: BLAS may round differently
                torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)
            else:  # the counting backend runs the traced ops themselves: the eager module's bits
                assert torch.equal(got, eager)
    assert counter.frame_count == 1


def test_plain_compile_traces_convolutional_specialists_in_one_graph():
    # The sequential executor (CNNs run one by one): each expert's rows come from the sizes op, and
    # BatchNorm sees a batch provably non-empty (the padding row).
    torch._dynamo.reset()
    switch, specialists = cnn_mnn(2, seed=7)  # two experts: each is traced on its own
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.1)
    assert mnn.executor == "sequential"
    counter = CompileCounter()
    compiled = torch.compile(mnn, backend=counter, dynamic=True)
    with torch.no_grad():
        for batch in (6, 9):
            x = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(compiled(x), mnn(x), atol=1e-6, rtol=1e-6)
    assert counter.frame_count == 1


def test_plain_compile_has_no_graph_break():
    # explain runs under dynamo's default settings: exactly what plain torch.compile(mnn) meets.
    switch, specialists = mlp_mnn(6, seed=7)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.1)
    with torch.no_grad():
        explanation = torch._dynamo.explain(mnn)(torch.randn(16, 24))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_default_dynamic_compiles_twice_over_batch_sizes():
    # torch.compile's default (dynamic=None): the first batch size is compiled static, the second
    # recompiles once with a symbolic batch, which every later size reuses.
    torch._dynamo.reset()
    switch, specialists = mlp_mnn(6, seed=7)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.1)
    counter = CompileCounter()
    compiled = torch.compile(mnn, backend=counter)
    with torch.no_grad():
        for batch in (3, 5, 7, 37):
            x = torch.randn(batch, 24)
            assert torch.equal(compiled(x), mnn(x))
    assert counter.frame_count == 2


@torch.no_grad()
def test_plain_compile_matches_eager_with_inductor():
    # The default backend (inductor) fuses the switch: equal to float32 rounding, same decisions.
    torch._dynamo.reset()
    switch, specialists = mlp_mnn(6, seed=7)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.1)
    compiled = torch.compile(mnn, dynamic=True)
    for batch in (37, 64):
        x = torch.randn(batch, 24)
        got, eager = compiled(x), mnn(x)
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.argmax(1), eager.argmax(1))


@pytest.mark.parametrize("call", CALLS)
def test_graph_inputs_do_not_grow_with_the_experts_for_each_call(call):
    # The forward hooks hold the stacks around every call, so plain torch.compile reads one stacked
    # input per layer as mnn_fast.compile does: E=4 and E=16 trace graphs of one size.
    counts = []
    for experts in (4, 16):
        torch._dynamo.reset()
        switch, specialists = mlp_mnn(experts, seed=3)
        mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
        backend, seen = _graph_input_counter()
        with torch.no_grad():
            x = torch.randn(32, 24)
            assert torch.equal(CALLS[call](mnn, backend=backend)(x), mnn(x))
        assert len(seen) == 1
        counts.append(seen[0])
    assert counts[0] == counts[1], counts


def _scale_in_place(specialists):
    for s in specialists:
        s[-1].weight.mul_(-2.0)


def _load_other_weights(specialists):
    for s in specialists:
        s.load_state_dict({k: torch.randn_like(v) for k, v in s.state_dict().items()})


def _assign_new_parameter(specialists):
    for s in specialists:
        s[0].weight = nn.Parameter(torch.randn_like(s[0].weight))


@pytest.mark.parametrize("update", [_scale_in_place, _load_other_weights, _assign_new_parameter],
                         ids=["in_place", "load_state_dict", "new_parameter"])
@pytest.mark.parametrize("call", ["plain", "fullgraph"])
def test_plain_compiled_module_sees_weight_updates(call, update):
    # The stacks are checked against the parameters' version counters and storage before each call:
    # an optimizer step (in place), a loaded checkpoint and a newly assigned Parameter all reach the
    # next call; the in-place kinds through the same graph.
    torch._dynamo.reset()
    switch, specialists = mlp_mnn(5, seed=4)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    counter = CompileCounter()
    compiled = CALLS[call](mnn, backend=counter)
    x = torch.randn(40, 24)
    with torch.no_grad():
        before = compiled(x)
        update(specialists)
        after = compiled(x)
        assert not torch.equal(before, after)
        assert torch.equal(after, mnn(x))
    if update is not _assign_new_parameter:
        assert counter.frame_count == 1
    assert not mnn._grouped.stacks_held


def test_hold_is_released_when_the_forward_raises():
    # The release hook runs even when forward raises: a later traced call must not be told the
    # stacks are fresh by a hold nobody closed.
    switch, specialists = mlp_mnn(4, seed=1)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    compiled = torch.compile(mnn, backend=CompileCounter())
    with torch.no_grad():
        for call in (mnn, compiled):
            with pytest.raises(ValueError, match="x must have shape"):
                call(torch.randn(24))
            assert not mnn._grouped.stacks_held


def test_module_inside_a_compiled_model_traces_one_graph():
    # Dynamo inlines the module's call here, hooks included: they trace as no-ops and the graph
    # stacks the parameters itself, so fullgraph holds and weight updates still reach the output.
    torch._dynamo.reset()
    switch, specialists = mlp_mnn(5, seed=2)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    model = nn.Sequential(nn.Identity(), mnn)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(30, 24)
    with torch.no_grad():
        assert torch.equal(compiled(x), mnn(x))
        _scale_in_place(specialists)
        assert torch.equal(compiled(x), mnn(x))
    assert counter.frame_count == 1


# Why each: experts with rows and without, no expert, one expert.
@pytest.mark.parametrize("counts", [[3, 0, 5], [], [7]], ids=["mixed", "no_experts", "one"])
def test_expert_sizes_op_passes_opcheck(counts):
    counts = torch.tensor(counts, dtype=torch.long)
    torch.library.opcheck(torch.ops.mnn_fast.expert_sizes.default, (counts,))
    assert torch.ops.mnn_fast.expert_sizes(counts) == counts.tolist()


def test_stack_hooks_only_on_grouped_linear_stacks_wrapped_by_torch_compile():
    # The hooks cost every call nn.Module's slower hook path: only where they hold something (a
    # grouped Linear stack that torch.compile wraps), and they follow the executor when the module
    # is rebuilt (.to(), unpickling).
    switch, specialists = mlp_mnn(4, seed=1)
    grouped = MetaNeuralNetwork(switch, specialists, threshold=0.1)
    sequential = MetaNeuralNetwork(switch, specialists, threshold=0.1, executor="sequential")
    assert not grouped._forward_pre_hooks and not grouped._forward_hooks  # eager use: none
    nn.Sequential(grouped)  # a parent that is not torch.compile's wrapper: still none
    assert not grouped._forward_pre_hooks and not grouped._forward_hooks
    torch.compile(grouped), torch.compile(sequential)
    torch.compile(grouped)  # wrapped twice: still one pair
    assert len(grouped._forward_pre_hooks) == 1 and len(grouped._forward_hooks) == 1
    older = MetaNeuralNetwork(switch, specialists, threshold=0.1)
    del older.__dict__["_wrapped_for_compile"]  # as unpickled from a version without the flag
    torch.compile(older)
    assert len(older._forward_pre_hooks) == 1
    assert not sequential._forward_pre_hooks and not sequential._forward_hooks
    grouped.to(torch.float64)  # rebuilt: still one pair, not two
    assert len(grouped._forward_pre_hooks) == 1 and len(grouped._forward_hooks) == 1
    grouped.requested_executor = "sequential"
    grouped.to(torch.float32)
    assert not grouped._forward_pre_hooks and not grouped._forward_hooks
    assert not grouped._forward_hooks_always_called
