"""The routing engine: ``MetaNeuralNetwork`` over public stages, the custom ops and their backends.

stages: switch_scores -> route_batch -> gather_rows -> run_specialists -> recombine_log_probs. backends: one place choosing cpp / cuda / triton / torch, with reasons.
executors: how the specialists run (sequential, grouped, streams). compile: scoped torch.compile.
"""
from .backends import BACKEND_NAMES, Backend, backend_status, get_backend, select_backend
from .compile import compile, compile_settings
from .contributions import ClassTables, class_tables, expert_log_contribution, specialist_contributions
from .executors import EXECUTOR_NAMES, select_executor
from .module import MetaNeuralNetwork
from .routing import Routing, check_threshold, check_top_k, normalize_groups, route
from .stages import (SwitchScores, check_specialist_output, combine_log_probs, gather_rows, recombine_log_probs,
                     route_batch, run_specialists, switch_scores)

__all__ = [
    "MetaNeuralNetwork", "Routing", "route", "Backend", "BACKEND_NAMES", "backend_status", "get_backend",
    "select_backend", "compile", "compile_settings", "ClassTables", "class_tables", "expert_log_contribution",
    "specialist_contributions", "EXECUTOR_NAMES", "select_executor", "check_threshold", "check_top_k",
    "normalize_groups", "SwitchScores", "switch_scores", "route_batch", "gather_rows", "run_specialists",
    "check_specialist_output", "combine_log_probs", "recombine_log_probs",
]
