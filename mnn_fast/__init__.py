"""mnn_fast: Meta Neural Networks whose routing runs on fused kernels.

``MetaNeuralNetwork(switch, specialists)`` is a drop-in ``nn.Module``; ``route`` exposes the routing
alone; ``reference.naive_forward`` is the paper's loop that everything is tested against;
``mnn_fast.compile(mnn)`` compiles it with the routing settings scoped to its own calls;
``load_exported(path)`` runs a package written by ``mnn-fast export`` (:mod:`mnn_fast.serving`).
Importing the package changes no global torch setting.
"""
from . import reference
from ._version import __version__
from .engine import MetaNeuralNetwork, Routing, backend_status, compile, route, select_backend
from .serving import load_exported

__all__ = ["MetaNeuralNetwork", "Routing", "route", "reference", "backend_status", "select_backend", "compile",
           "load_exported"]
