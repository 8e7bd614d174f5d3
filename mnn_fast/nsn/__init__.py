"""Detachable specialists: networks with sub-networks (NSN), depth chosen at inference.

model: ``DetachableMLP``, a base MLP whose input-side layers can be removed. train: every sub-model's
loss with gradients shared by neighbouring pairs. experiment: ``mnn-fast nsn``, NSN vs separately
trained models vs a normally trained base with layers removed.
"""
from .model import DetachableMLP, linear_macs
from .train import PaperMomentum, TrainResult, depth_accuracy, paired_gradients, train_detachable

__all__ = ["DetachableMLP", "linear_macs", "PaperMomentum", "TrainResult", "depth_accuracy", "paired_gradients",
           "train_detachable"]
