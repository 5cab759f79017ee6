"""Noise calibration: the smallest noise multiplier that meets a target (epsilon, delta)."""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

from . import _validation as V
from .pld import PLDAccountant
from .rdp import RDPAccountant

__all__ = ["calibrate_noise_multiplier", "steps_for_epochs"]

#: default search range for the noise multiplier
NOISE_RANGE: Tuple[float, float] = (0.1, 1000.0)


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Number of steps in ``epochs`` passes over the data at Poisson rate ``sample_rate``:
    ceil(epochs / sample_rate) (rounded first to 9 digits, so 1 / 0.01 is 100, not 101)."""
    epochs = V._real("epochs", epochs)
    if not (epochs > 0 and math.isfinite(epochs)):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")
    q = V.check_sample_rate(sample_rate)
    return max(1, math.ceil(round(epochs / q, 9)))


def _make_epsilon_fn(accountant: str, delta: float, sample_rate: float, steps: int) -> Callable[[float], float]:
    if accountant == "pld":

        def eps(sigma: float) -> float:
            return PLDAccountant().step(sigma, sample_rate, steps).epsilon(delta)
    elif accountant == "rdp":

        def eps(sigma: float) -> float:
            return RDPAccountant().step(sigma, sample_rate, steps).epsilon(delta)
    else:
        raise ValueError(f"accountant must be 'pld' or 'rdp', got {accountant!r}")
    return eps


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: Optional[int] = None,
    *,
    epochs: Optional[float] = None,
    accountant: str = "pld",
    noise_range: Tuple[float, float] = NOISE_RANGE,
    rtol: float = 1e-4,
) -> float:
    """The smallest noise multiplier sigma for which ``steps`` steps (or ``epochs`` epochs) of
    the Poisson-subsampled Gaussian mechanism at ``sample_rate`` are (target_epsilon, delta)-DP
    under add/remove-one adjacency, as reported by ``accountant`` ("pld", the default and
    tight, or "rdp").

    The returned sigma always meets the target (its reported epsilon is <= target_epsilon) and
    exceeds the smallest such sigma by at most a factor ``1 + rtol`` (default 1e-4, i.e. it is
    correct to at least 3 significant digits). Epsilon decreases with sigma; the solver keeps
    a bracket [lo, hi] with eps(lo) > target >= eps(hi) and narrows it by regula falsi
    (Illinois variant) on log(epsilon) against log(sigma), falling back to bisection.

    Raises ``ValueError`` when the target cannot be met inside ``noise_range`` (even its largest
    sigma gives a larger epsilon) or is met by its smallest sigma already (no smallest one
    inside the range); widen ``noise_range`` in that case.
    """
    target = V.check_epsilon(target_epsilon, "target_epsilon")
    if target <= 0:
        raise ValueError("target_epsilon must be > 0 (epsilon = 0 needs infinite noise)")
    delta = V.check_delta(delta)
    q = V.check_sample_rate(sample_rate)
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    n = V.check_steps(steps) if steps is not None else steps_for_epochs(epochs, q)
    if n == 0:
        raise ValueError("steps must be >= 1: zero steps need no noise")
    lo, hi = (float(noise_range[0]), float(noise_range[1]))
    V.check_noise_multiplier(lo)
    V.check_noise_multiplier(hi)
    if not lo < hi:
        raise ValueError(f"noise_range must be (low, high) with low < high, got {noise_range!r}")
    if not 0 < rtol < 0.01:
        raise ValueError("rtol must be in (0, 0.01)")
    eps = _make_epsilon_fn(accountant, delta, q, n)

    e_hi = eps(hi)
    if e_hi > target:
        raise ValueError(
            f"target_epsilon={target:g} at delta={delta:g} cannot be reached: even noise_multiplier={hi:g} "
            f"(the top of noise_range) gives epsilon={e_hi:.4g} with sample_rate={q:g} and {n} steps; "
            "raise noise_range, or accept a larger epsilon, fewer steps or a smaller sample rate"
        )
    e_lo = eps(lo)
    if e_lo <= target:
        raise ValueError(
            f"target_epsilon={target:g} at delta={delta:g} is met by every noise multiplier in noise_range, "
            f"even {lo:g} (epsilon={e_lo:.4g}): lower the bottom of noise_range"
        )
    return _solve(eps, target, lo, hi, e_lo, e_hi, rtol)


def _solve(eps, target: float, lo: float, hi: float, e_lo: float, e_hi: float, rtol: float) -> float:
    """Regula falsi (Illinois) on g(u) = log eps(e^u) - log target, bracket kept throughout."""
    log_t = math.log(target)

    def g(e: float) -> float:
        if e <= 0:
            return -math.inf
        return math.log(e) - log_t

    u_lo, u_hi = math.log(lo), math.log(hi)
    g_lo, g_hi = g(e_lo), g(e_hi)  # g_lo > 0 >= g_hi
    side = 0
    for _ in range(200):
        if u_hi - u_lo <= math.log1p(rtol):
            break
        if math.isfinite(g_lo) and math.isfinite(g_hi) and g_lo > g_hi:
            u = u_hi - g_hi * (u_hi - u_lo) / (g_hi - g_lo)
            # keep clear of the ends so that a flat or curved g still shrinks the bracket
            width = u_hi - u_lo
            u = min(max(u, u_lo + 0.02 * width, u_lo + 0.3 * math.log1p(rtol)), u_hi - 0.3 * math.log1p(rtol))
        else:
            u = 0.5 * (u_lo + u_hi)
        gu = g(eps(math.exp(u)))
        if gu > 0:
            u_lo, g_lo = u, gu
            if side == -1:
                g_hi *= 0.5
            side = -1
        else:
            u_hi, g_hi = u, gu
            if side == 1:
                g_lo *= 0.5
            side = 1
    return math.exp(u_hi)
