"""Renyi-DP (moments) accountant for DP-SGD: exact RDP of the Poisson-subsampled Gaussian.

Adjacency is add/remove-one. One step at sample rate q and noise multiplier sigma has, at
order alpha > 1, the Renyi divergence (Mironov, Talwar & Zhang 2019, "Renyi differential
privacy of the sampled Gaussian mechanism"; they show the "remove" direction below is the
larger of the two)

    RDP(alpha) = log(A_alpha) / (alpha - 1),
    A_alpha = E_{z ~ N(0, sigma^2)} [ ((1 - q) + q exp((2z - 1) / (2 sigma^2)))^alpha ].

RDP composes additively over steps and segments; the composed curve is converted to
(epsilon, delta) with the bound of Canonne, Kamath & Steinke 2020 / Asoodeh et al. 2020,
minimised over the orders:

    epsilon = min_alpha  RDP(alpha) + log(1 - 1/alpha) - (log(delta) + log(alpha)) / (alpha - 1),
    delta   = min_alpha  exp((alpha - 1)(RDP(alpha) - epsilon + log(1 - 1/alpha)) - log(alpha)),

and, whatever the order, delta(epsilon) <= delta(0) = TV <= sqrt(1 - exp(-RDP(alpha)))
(Bretagnolle-Huber with KL <= RDP(alpha)), which gives epsilon = 0 when delta is that large.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy.special import gammaln, gammasgn, log_ndtr, logsumexp

from . import _validation as V
from ._history import AccountantBase

__all__ = [
    "RDPAccountant",
    "DEFAULT_ORDERS",
    "compute_rdp",
    "rdp_to_epsilon",
    "rdp_to_delta",
]

#: Google dp_accounting's default grid (1.1 to 10.9 by 0.1, 11 to 63, 128 to 1024) with
#: orders 1.01 to 1.09 added for very large epsilon, where the best order is close to 1.
DEFAULT_ORDERS: Tuple[float, ...] = tuple(
    [1 + x / 100.0 for x in range(1, 10)]
    + [1 + x / 10.0 for x in range(1, 100)]
    + list(range(11, 64))
    + [128, 256, 512, 1024]
)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha: the binomial expansion of the integrand, integrated term
    by term (E[e^{k(2z-1)/(2 sigma^2)}] = e^{(k^2-k)/(2 sigma^2)}), all terms positive:

        A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)).
    """
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    terms = log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma * sigma)
    return float(logsumexp(terms))


def _log_a_frac(q: float, sigma: float, alpha: float, rtol: float = 1e-13, max_terms: int = 1 << 20) -> float:
    """log A_alpha for fractional alpha (Mironov, Talwar & Zhang 2019, Sec. 3.3). Split the
    integral at z0 = sigma^2 log(1/q - 1) + 1/2, where q e^{(2z-1)/(2 sigma^2)} = 1 - q, and
    expand the power binomially around the larger of the two summands on each side:

        A_alpha = sum_{k>=0} C(alpha,k) (1-q)^(alpha-k) q^k e^{(k^2-k)/(2 sigma^2)} Phi((z0-k)/sigma)
                + sum_{k>=0} C(alpha,k) q^(alpha-k) (1-q)^k e^{(j^2-j)/(2 sigma^2)} Phi((j-z0)/sigma),
                                                                              j = alpha - k.

    Past k = alpha + 1 the binomial coefficients alternate in sign and the terms shrink, so
    the remainder after the last summed term is at most that term's magnitude; terms are
    added (in log space, with signs) until it falls below ``rtol`` times the sum.
    """
    s2 = sigma * sigma
    z0 = s2 * math.log(1.0 / q - 1.0) + 0.5
    lq, l1q = math.log(q), math.log1p(-q)
    n = max(256, 2 * math.ceil(alpha) + 16)
    while True:
        k = np.arange(n, dtype=np.float64)
        log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
        sign = gammasgn(alpha - k + 1)
        j = alpha - k
        t1 = log_binom + (alpha - k) * l1q + k * lq + (k * k - k) / (2 * s2) + log_ndtr((z0 - k) / sigma)
        t2 = log_binom + j * lq + k * l1q + (j * j - j) / (2 * s2) + log_ndtr((j - z0) / sigma)
        terms = np.concatenate([t1, t2])
        signs = np.concatenate([sign, sign])
        total, total_sign = logsumexp(terms, b=signs, return_sign=True)
        last = max(t1[-1], t2[-1])
        if total_sign <= 0:
            raise FloatingPointError(f"RDP series lost all precision (q={q}, sigma={sigma}, alpha={alpha})")
        if last - total < math.log(rtol) or n >= max_terms:
            if last - total >= math.log(1e-6):
                raise FloatingPointError(
                    f"RDP series did not converge (q={q}, sigma={sigma}, alpha={alpha}); use integer orders"
                )
            return float(total)
        n *= 4


@lru_cache(maxsize=4096)
def _rdp_one(q: float, sigma: float, alpha: float) -> float:
    if q == 1.0:
        return alpha / (2 * sigma * sigma)
    if float(alpha).is_integer():
        log_a = _log_a_int(q, sigma, int(alpha))
    else:
        log_a = _log_a_frac(q, sigma, alpha)
    return max(0.0, log_a / (alpha - 1))


def compute_rdp(noise_multiplier: float, sample_rate: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of ONE step of the Poisson-subsampled Gaussian mechanism at each order (> 1),
    add/remove-one adjacency; exact up to float round-off (see the module docstring)."""
    sigma = V.check_noise_multiplier(noise_multiplier)
    q = V.check_sample_rate(sample_rate)
    orders = _check_orders(orders)
    return np.array([_rdp_one(q, sigma, float(a)) for a in orders])


def _check_orders(orders: Sequence[float]) -> np.ndarray:
    orders = np.asarray(orders, dtype=np.float64).ravel()
    if orders.size == 0 or not np.all(np.isfinite(orders)) or np.any(orders <= 1):
        raise ValueError("RDP orders must be a non-empty list of finite numbers > 1")
    return orders


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> Tuple[float, float]:
    """(epsilon, best order) from a composed RDP curve (conversion in the module docstring)."""
    delta = V.check_delta(delta)
    orders = _check_orders(orders)
    rdp = np.asarray(rdp, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        eps = rdp + np.log1p(-1.0 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
        eps = np.where(delta * delta + np.expm1(-rdp) > 0, 0.0, eps)  # delta >= TV bound: epsilon 0
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), float(orders[i])


def rdp_to_delta(orders: Sequence[float], rdp: Sequence[float], epsilon: float) -> Tuple[float, float]:
    """(delta, best order) from a composed RDP curve (conversion in the module docstring)."""
    epsilon = V.check_epsilon(epsilon)
    orders = _check_orders(orders)
    rdp = np.asarray(rdp, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        log_delta = (orders - 1) * (rdp - epsilon + np.log1p(-1.0 / orders)) - np.log(orders)
        tv = 0.5 * np.log(-np.expm1(-rdp))  # log sqrt(1 - e^-RDP)
        log_delta = np.minimum(log_delta, tv)
    log_delta = np.where(np.isnan(log_delta), np.inf, log_delta)
    i = int(np.argmin(log_delta))
    return float(min(1.0, math.exp(min(log_delta[i], 0.0)))), float(orders[i])


class RDPAccountant(AccountantBase):
    """Renyi-DP accountant for DP-SGD (Poisson sampling, Gaussian noise).

    Adjacency is add/remove-one. The RDP of each step is exact (closed binomial sum at
    integer orders, the Mironov-Talwar-Zhang series at fractional ones), composition is
    additive, and ``epsilon`` / ``delta`` use the Canonne-Kamath-Steinke conversion over
    ``orders`` (default: ``DEFAULT_ORDERS``). RDP accounting is an upper bound, generally
    looser than ``PLDAccountant``; it is fast and a common reference.
    """

    kind = "rdp"

    def __init__(self, orders: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.orders = _check_orders(DEFAULT_ORDERS if orders is None else orders)

    def _config(self):
        return {"orders": [float(a) for a in self.orders]}

    def _load_config(self, config):
        if "orders" in config:
            self.orders = _check_orders(config["orders"])

    def rdp(self) -> np.ndarray:
        """The composed RDP curve at ``self.orders``."""
        total = np.zeros(len(self.orders))
        for seg in self._history:
            total += seg.steps * compute_rdp(seg.noise_multiplier, seg.sample_rate, self.orders)
        return total

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of the recorded history (add/remove-one adjacency)."""
        return self.epsilon_and_order(delta)[0]

    def epsilon_and_order(self, delta: float) -> Tuple[float, float]:
        """(epsilon, the order that attains it)."""
        delta = V.check_delta(delta)
        if not self._history:
            return 0.0, float(self.orders[0])
        return rdp_to_epsilon(self.orders, self.rdp(), delta)

    def delta(self, epsilon: float) -> float:
        """Delta at ``epsilon`` of the recorded history (add/remove-one adjacency)."""
        epsilon = V.check_epsilon(epsilon)
        if not self._history:
            return 0.0
        return rdp_to_delta(self.orders, self.rdp(), epsilon)[0]
