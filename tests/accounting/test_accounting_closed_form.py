"""Closed-form and quadrature checks that need no oracle package."""

import math

import numpy as np
import pytest

from dpkernels.accounting import PLDAccountant, RDPAccountant, compute_rdp
from dpkernels.accounting.pld import compose, single_step_pmf

from accounting_reference import (
    gaussian_delta,
    gaussian_epsilon,
    rdp_by_quadrature,
    rdp_reverse_by_quadrature,
)


@pytest.mark.parametrize("sigma", [0.5, 0.8, 1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-6, 1e-9])
def test_one_full_batch_step_is_the_gaussian_mechanism(sigma, delta):
    # q = 1, one step: the Gaussian mechanism with sensitivity 1, whose exact curve is
    # delta(eps) = Phi(-eps sigma + 1/(2 sigma)) - e^eps Phi(-eps sigma - 1/(2 sigma)).
    acc = PLDAccountant().step(sigma, 1.0, 1)
    exact = gaussian_epsilon(delta, 1 / sigma)
    eps = acc.epsilon(delta)
    assert exact <= eps <= exact * (1 + 1e-5) + 1e-9
    lo, hi = acc.epsilon_bounds(delta)
    assert lo <= exact <= hi
    for e in (0.0, 0.5 * exact, exact, 2 * exact):
        d_exact = gaussian_delta(e, 1 / sigma)
        d = acc.delta(e)
        assert d_exact <= d <= d_exact * (1 + 1e-4) + 1e-13
        d_lo, d_hi = acc.delta_bounds(e)
        assert d_lo <= d_exact * (1 + 1e-9) and d_hi == d


@pytest.mark.parametrize("sigma,steps", [(1.0, 10), (2.0, 1000), (5.0, 10_000), (0.7, 3)])
def test_full_batch_composition_is_a_gaussian(sigma, steps):
    # n Gaussian mechanisms with noise sigma compose to one with sensitivity sqrt(n).
    acc = PLDAccountant().step(sigma, 1.0, steps)
    for delta in (1e-5, 1e-6):
        exact = gaussian_epsilon(delta, math.sqrt(steps) / sigma)
        assert exact <= acc.epsilon(delta) <= exact * (1 + 1e-4)


def test_rdp_full_batch_is_alpha_over_two_sigma_squared():
    orders = np.array([1.5, 2, 3.25, 10, 64])
    np.testing.assert_allclose(compute_rdp(1.3, 1.0, orders), orders / (2 * 1.3**2), rtol=1e-15)


@pytest.mark.parametrize(
    "sigma,q,alpha",
    [
        (1.0, 0.01, 1.5),
        (0.5, 0.1, 1.1),
        (1.0, 0.1, 1.3),
        (4.0, 0.1, 1.2),
        (2.0, 0.001, 2.5),
        (0.8, 0.5, 3.7),
        (1.0, 0.01, 2.0),
        (3.0, 0.2, 7.0),
        (0.6, 0.02, 10.5),
    ],
)
def test_rdp_series_matches_quadrature(sigma, q, alpha):
    # the Mironov-Talwar-Zhang series (fractional) and binomial sum (integer) against direct
    # numerical integration of E_{N(0,s^2)}[(M/N0)^alpha]
    got = compute_rdp(sigma, q, [alpha])[0]
    assert got == pytest.approx(rdp_by_quadrature(sigma, q, alpha), rel=1e-8)


@pytest.mark.parametrize("sigma,q,alpha", [(0.5, 0.1, 1.5), (1.0, 0.01, 2.0), (2.0, 0.3, 4.0), (1.0, 0.5, 8.0)])
def test_rdp_remove_direction_dominates(sigma, q, alpha):
    # Mironov-Talwar-Zhang: D_alpha(M || N0) >= D_alpha(N0 || M), so one direction suffices.
    assert rdp_reverse_by_quadrature(sigma, q, alpha) <= compute_rdp(sigma, q, [alpha])[0]


def test_rdp_conversion_formula():
    # epsilon = min_alpha rdp + log(1 - 1/alpha) - (log delta + log alpha) / (alpha - 1)
    acc = RDPAccountant(orders=[2.0, 8.0, 32.0]).step(2.0, 1.0, 10)
    rdp = 10 * np.array([2.0, 8.0, 32.0]) / 8.0
    orders = np.array([2.0, 8.0, 32.0])
    expect = np.min(rdp + np.log1p(-1 / orders) - (math.log(1e-5) + np.log(orders)) / (orders - 1))
    assert acc.epsilon(1e-5) == pytest.approx(expect, rel=1e-12)
    # delta(epsilon) inverts it at the optimal order
    assert acc.delta(acc.epsilon(1e-5)) == pytest.approx(1e-5, rel=1e-9)


def test_pld_bounds_bracket_and_discretisation_is_explicit():
    acc = PLDAccountant().step(1.1, 0.004, 1000)
    lo, hi = acc.epsilon_bounds(1e-5)
    assert 0 < lo <= hi
    rep = acc.error_report()
    assert 0 < rep["value_discretization_interval"] < 1e-3
    for d in ("remove", "add"):
        assert rep[f"{d}_truncated_mass_above"] <= 1e-13
        assert rep[f"{d}_infinity_mass"] <= 1e-13
    # a coarser lattice is still an upper bound, and the answer converges from above
    coarse = PLDAccountant(value_discretization_interval=1e-3).step(1.1, 0.004, 1000).epsilon(1e-5)
    assert coarse >= hi * (1 - 1e-9)
    assert coarse <= hi * 1.01


def test_connect_the_dots_keeps_both_masses():
    # each interval's P-mass and Q-mass are kept: sum of P = 1, sum of e^-loss P = Q-mass <= 1
    for direction in ("remove", "add"):
        pmf = single_step_pmf(1.0, 0.05, 1e-3, direction)
        loss = (pmf.offset + np.arange(len(pmf.mass))) * pmf.h
        assert pmf.mass.sum() + pmf.inf_mass == pytest.approx(1.0, abs=1e-12)
        assert np.sum(pmf.mass * np.exp(-loss)) <= 1.0 + 1e-12
        assert pmf.mass.min() >= 0


def test_fft_composition_equals_direct_convolution():
    pmf = single_step_pmf(1.0, 0.1, 2e-3, "remove")
    direct = pmf.mass.copy()
    for _ in range(4):
        direct = np.convolve(direct, pmf.mass)
    c = compose([(pmf, 5)])
    full = np.zeros(len(direct))
    start = c.offset - 5 * pmf.offset
    lo, hi = max(start, 0), min(start + len(c.mass), len(direct))
    full[lo:hi] = c.mass[lo - start : hi - start]
    np.testing.assert_allclose(full, direct, atol=1e-14)


def test_small_epsilon_and_large_delta_edge_cases():
    acc = PLDAccountant().step(50.0, 1e-3, 1)
    assert acc.epsilon(0.5) == 0.0  # delta above the total variation distance
    assert 0.0 <= acc.delta(0.0) <= 1.0
    assert RDPAccountant().step(50.0, 1e-3, 1).epsilon(0.5) == 0.0
    empty = PLDAccountant()
    assert empty.epsilon(1e-5) == 0.0 and empty.delta(1.0) == 0.0
