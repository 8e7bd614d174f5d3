"""mnn_fast: Meta Neural Networks whose routing runs on fused kernels.

``MetaNeuralNetwork(switch, specialists)`` is a drop-in ``nn.Module``; ``route`` exposes the routing
alone; ``reference.naive_forward`` is the paper's loop that everything is tested against.
"""
import torch as _torch
import torch._inductor.config  # noqa: F401  (configured below)

from . import reference
from .backends import backend_status, select_backend
from .module import MetaNeuralNetwork
from .reference import Routing
from .routing import route

# Routing has data-dependent sizes (the number of routed rows, each expert's row count). Dynamo
# traces them without graph breaks only with these two flags, so importing mnn_fast turns them on.
_torch._dynamo.config.capture_scalar_outputs = True
_torch._dynamo.config.capture_dynamic_output_shape_ops = True
# Inductor's automatic channels-last rewrite of convolutions mis-predicts output strides when the
# batch size is data-dependent (each specialist's batch is), failing at run time with a stride
# assertion; convolutional specialists compile only with it off.
_torch._inductor.config.layout_optimization = False

__version__ = "0.1.0"
__all__ = ["MetaNeuralNetwork", "Routing", "route", "reference", "backend_status", "select_backend"]
