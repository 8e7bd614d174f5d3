"""Label groups from a network's own confusions (docs/experiments/label-groups.md) and auxiliary heads on them.

confusion: top-K confusion / co-detection matrices, S = A^T A, spectral clustering -> groups.
heads: a frozen base plus one hidden stack per group wired to that group's logits.
report: ``mnn-fast groups``, heads on learned groups against the paper's controls.
"""
from .confusion import (GROUP_KINDS, codetection_matrix, confusion_matrix, learn_groups, order_by_groups, similarity,
                        spectral_groups)
from .heads import AuxHeadNet, base_features, count_macs, head_overhead, train_heads

__all__ = ["confusion_matrix", "codetection_matrix", "similarity", "spectral_groups", "learn_groups", "order_by_groups",
           "GROUP_KINDS", "AuxHeadNet", "train_heads", "base_features", "count_macs", "head_overhead"]
