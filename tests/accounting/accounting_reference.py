"""Independent reference values for the accounting tests (closed forms and quadrature only)."""

import math

from scipy import integrate
from scipy.optimize import brentq
from scipy.special import log_ndtr
from scipy.stats import norm


def gaussian_delta(epsilon: float, mu: float) -> float:
    """Exact delta(epsilon) of the Gaussian mechanism with sensitivity/sigma = mu (Balle & Wang 2018):
    Phi(-epsilon/mu + mu/2) - e^epsilon Phi(-epsilon/mu - mu/2), evaluated in log space."""
    a = log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + log_ndtr(-epsilon / mu - mu / 2)
    return math.exp(a) * -math.expm1(b - a)


def gaussian_epsilon(delta: float, mu: float) -> float:
    """The epsilon solving gaussian_delta(epsilon, mu) = delta (0 if delta(0) <= delta)."""
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    f = lambda e: math.log(max(gaussian_delta(e, mu), 1e-300)) - math.log(delta)  # noqa: E731
    hi = 1.0
    while f(hi) > 0:
        hi *= 2
    return brentq(f, 0.0, hi, xtol=1e-14, rtol=1e-15)


def _pdf_times_expm1(z: float, sigma: float, v: float) -> float:
    """N(0, sigma^2) density at z times e^v - 1, without overflow."""
    if v < 300:
        return norm.pdf(z, scale=sigma) * math.expm1(v)
    return math.exp(norm.logpdf(z, scale=sigma) + v) - norm.pdf(z, scale=sigma)


def _integrate(f, sigma: float, alpha: float) -> float:
    pts = sorted({-10 * sigma, 0.0, 0.5, 1.0, alpha, alpha + 10 * sigma})
    total = 0.0
    edges = [-math.inf] + pts + [math.inf]
    for a, b in zip(edges[:-1], edges[1:]):
        total += integrate.quad(f, a, b, epsabs=0, epsrel=1e-13, limit=400)[0]
    return total


def rdp_by_quadrature(sigma: float, q: float, alpha: float) -> float:
    """D_alpha((1-q)N(0,s^2) + qN(1,s^2) || N(0,s^2)) by numerical integration of
    E_{z~N(0,s^2)}[(1 + q (e^{(2z-1)/(2s^2)} - 1))^alpha] - 1 (no cancellation near 1)."""
    s2 = sigma * sigma

    def f(z):
        u = (2 * z - 1) / (2 * s2)
        v = alpha * (
            math.log1p(q * math.expm1(u)) if u < 30 else math.log(q) + u + math.log1p((1 - q) / q * math.exp(-u))
        )
        return _pdf_times_expm1(z, sigma, v)

    return math.log1p(_integrate(f, sigma, alpha)) / (alpha - 1)


def rdp_reverse_by_quadrature(sigma: float, q: float, alpha: float) -> float:
    """D_alpha(N(0,s^2) || (1-q)N(0,s^2) + qN(1,s^2)) = log E_{N(0,s^2)}[(N0/M)^(alpha-1)] / (alpha-1)."""
    s2 = sigma * sigma

    def f(z):
        u = (2 * z - 1) / (2 * s2)
        log_ratio = (
            math.log1p(q * math.expm1(u)) if u < 30 else math.log(q) + u + math.log1p((1 - q) / q * math.exp(-u))
        )
        return _pdf_times_expm1(z, sigma, -(alpha - 1) * log_ratio)

    return math.log1p(_integrate(f, sigma, alpha)) / (alpha - 1)
