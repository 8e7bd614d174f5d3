"""Field checks for configs read from users and files: each failure is one line naming the field.

JSON happily holds ``"seed": "0"``, ``"lr": true`` or ``"num_classes": 1e9``; these helpers turn such
values into ``TypeError``/``ValueError`` before they reach a model or a file name. ``bool`` is never
accepted as a number (Python counts it as an ``int``).
"""
from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_real", "check_choice", "check_optional_str", "check_bool", "check_keys"]


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]" if lo is not None else f"<= {hi}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_real(name: str, value, lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float in the interval ``lo..hi`` (each end open or closed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if not math.isfinite(value) or too_low or too_high:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open or hi == math.inf else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_optional_str(name: str, value) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise TypeError(f"{name} must be a non-empty string or null, got {value!r} ({type(value).__name__})")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    return value


def check_keys(where: str, obj: dict, known) -> None:
    """``ValueError`` naming any key of ``obj`` outside ``known`` (a typo would otherwise be ignored)."""
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; expected fields among {sorted(known)}")
