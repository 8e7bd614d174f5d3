"""Graph hypernetworks (GHN-2, Knyazev et al. 2021): predict a network's parameters from its graph.

graph: ``extract_graph`` (torch.fx) turns an ``nn.Module`` into a graph of operations. model: ``GHN``,
a gated graph network over that graph (forward and backward passes, virtual edges) and a tiled
decoder with fan-in normalisation. sampler: random small CNNs. train: meta-batched training and
safetensors checkpoints. specialists: a GHN trained on a dataset, and the start it predicts for an MNN
specialist of any architecture. experiment: ``mnn-fast ghn``, predicted vs random initialisation before and
after fine-tuning, on held-out, deeper and wider architectures.
"""
from .graph import OP_TYPES, ArchGraph, Node, extract_graph
from .model import GHN, assign_parameters, fit_tile, predict_parameters
from .sampler import SPACES, ArchSpec, SampledCNN, SearchSpace, sample_architectures
from .specialists import GHN_TRAINING, predicted_state, train_ghn_on_data, training_pool
from .train import load_ghn, meta_loss, save_ghn, train_ghn

__all__ = ["OP_TYPES", "ArchGraph", "Node", "extract_graph", "GHN", "assign_parameters", "fit_tile",
           "predict_parameters", "SPACES", "ArchSpec", "SampledCNN", "SearchSpace", "sample_architectures",
           "load_ghn", "meta_loss", "save_ghn", "train_ghn", "GHN_TRAINING", "predicted_state",
           "train_ghn_on_data", "training_pool"]
