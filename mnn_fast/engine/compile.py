"""``mnn_fast.compile``: ``torch.compile`` with the settings some models need, scoped to this model.

Plain ``torch.compile(mnn)`` traces the module as one graph with torch's defaults (the ops' fake
kernels size data-dependent outputs themselves, docs/inference.md). Two cases still need settings:
the ``torch`` backend's routing (``nonzero``, ``.tolist()``) splits the graph unless dynamo's
``capture_scalar_outputs`` and ``capture_dynamic_output_shape_ops`` are on, and inductor's automatic
channels-last rewrite (``layout_optimization``) mis-predicts conv output strides for data-dependent
batch sizes and fails at run time. Rather than change these for every model in the process at
import, the returned module applies them around its own calls (where tracing and compilation
happen) and restores them after; it also holds the grouped stacks of every module inside the
compiled one, which dynamo would otherwise inline, hooks and all.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["compile", "compile_settings", "COMPILE_SETTINGS"]

COMPILE_SETTINGS = {
    "dynamo": {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True},
    "inductor": {"layout_optimization": False},
}


@contextlib.contextmanager
def compile_settings():
    """Within the block, dynamo and inductor use :data:`COMPILE_SETTINGS`; restored on exit."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    with dynamo_config.patch(COMPILE_SETTINGS["dynamo"]), inductor_config.patch(COMPILE_SETTINGS["inductor"]):
        yield


class CompiledModule(nn.Module):
    """``torch.compile(module, **kwargs)``, called inside :func:`compile_settings`.

    ``.module`` is the original module (its parameters are shared), ``.compiled`` the optimised one;
    only ``.module`` is a registered submodule, so ``state_dict()`` holds each tensor once.
    """

    def __init__(self, module: nn.Module, **kwargs):
        super().__init__()
        self.module = module
        # Not registered: it wraps the same module, whose tensors would otherwise appear twice.
        object.__setattr__(self, "compiled", torch.compile(module, **kwargs))
        from .module import MetaNeuralNetwork  # module.py does not import this file; kept lazy anyway

        # Found once: walking every submodule on each call would cost ~10 us per 100 modules.
        self._mnns = [m for m in module.modules() if isinstance(m, MetaNeuralNetwork)]

    def forward(self, *args, **kwargs):
        with compile_settings(), contextlib.ExitStack() as held:
            for mnn in self._mnns:
                held.enter_context(mnn.weights_stacked_for_compiled_calls())
            return self.compiled(*args, **kwargs)


def compile(module: nn.Module, **kwargs) -> CompiledModule:  # noqa: A001  (mirrors torch.compile)
    """``torch.compile(module, **kwargs)`` for a :class:`~mnn_fast.MetaNeuralNetwork` (or any module
    holding one), with the routing settings applied only to its own calls."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    return CompiledModule(module, **kwargs)
