"""mnn_fast: Meta Neural Networks on fused routing kernels."""
from . import reference
from .reference import Routing

__all__ = ["reference", "Routing"]
