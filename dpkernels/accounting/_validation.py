"""Argument checks shared by the accountants: every refusal says which argument and why."""

from __future__ import annotations

import math
import numbers


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def check_noise_multiplier(value) -> float:
    """sigma: the Gaussian noise standard deviation divided by the L2 sensitivity (clip norm)."""
    value = _real("noise_multiplier", value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"noise_multiplier must be a finite number > 0, got {value!r} "
            "(noise_multiplier = noise std / clipping norm; 0 means no privacy at all)"
        )
    return value


def check_sample_rate(value) -> float:
    value = _real("sample_rate", value)
    if not (0.0 < value <= 1.0):
        raise ValueError(
            f"sample_rate must be in (0, 1], got {value!r} "
            "(the Poisson sampling probability of each example per step; 1 = full batch)"
        )
    return value


def check_steps(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(f"steps must be an integer, got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"steps must be >= 0, got {value}")
    return value


def check_delta(value) -> float:
    value = _real("delta", value)
    if not (0.0 < value < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {value!r}")
    return value


def check_epsilon(value, name: str = "epsilon") -> float:
    value = _real(name, value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value
