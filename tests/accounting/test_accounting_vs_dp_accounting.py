"""The accountants against Google's dp_accounting (a test-only dependency) on the required grid:
sigma in {0.5, 1, 2, 4} x q in {1e-3, 1e-2, 0.1, 1} x steps in {1, 100, 10000} x delta in
{1e-5, 1e-6}. dp_accounting's answers are computed here (nothing is cached to disk).

PLD: epsilon within 1% of dp_accounting's (pessimistic) PLD epsilon and never below its
optimistic estimate. RDP: within 1% of dp_accounting's RDP epsilon on the same orders; where
dp_accounting's fractional-order RDP series is inexact (it overestimates, see the test), ours
is lower and is checked against quadrature instead.
"""

import functools
import logging
import math

import numpy as np
import pytest

from dpkernels.accounting import PLDAccountant, RDPAccountant
from dpkernels.accounting.rdp import compute_rdp, rdp_to_epsilon

dp_accounting = pytest.importorskip("dp_accounting", reason="the oracle: pip install dp-accounting")
from dp_accounting.pld import privacy_loss_distribution as dp_pld  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp  # noqa: E402

from accounting_reference import gaussian_epsilon, rdp_by_quadrature  # noqa: E402

logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's RDP series warns a lot

SIGMAS = [0.5, 1.0, 2.0, 4.0]
RATES = [1e-3, 1e-2, 0.1, 1.0]
STEPS = [1, 100, 10_000]
DELTAS = [1e-5, 1e-6]
CELLS = [(s, q, n) for s in SIGMAS for q in RATES for n in STEPS]


def _dp_interval(sigma, q):
    # dp_accounting's default discretisation (1e-4) is too coarse for the tiny epsilons of
    # sigma=4, q=1e-3 (epsilon 4e-4 .. 0.09): its own answer is 1.4% above its answer at 1e-6,
    # to which ours agrees to 1e-5. Everywhere else the default is used.
    return 1e-6 if (sigma, q) == (4.0, 1e-3) else 1e-4


@functools.lru_cache(maxsize=1)  # cells of one (sigma, q) run one after the other
def _dp_single_step(sigma, q):
    h = _dp_interval(sigma, q)
    pess = dp_pld.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=h, pessimistic_estimate=True
    )
    opt = dp_pld.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=h, pessimistic_estimate=False, use_connect_dots=False
    )
    return pess, opt


def _dp_plds(sigma, q, n):
    pess, opt = _dp_single_step(sigma, q)
    return pess.self_compose(n), opt.self_compose(n)


@pytest.mark.parametrize("sigma,q,n", CELLS, ids=[f"s{s}-q{q}-n{n}" for s, q, n in CELLS])
def test_pld_matches_dp_accounting(sigma, q, n):
    ours = PLDAccountant().step(sigma, q, n)
    if q == 1.0 and n == 10_000:
        # Full batch, 10,000 steps: epsilon is 418 .. 20852. dp_accounting needs 2-17 s per
        # cell here and its epsilon search loses precision above epsilon ~ 745 (exp(-loss)
        # underflows, and it falls back to returning a lattice loss: about +1 too high, and its
        # "optimistic" estimate then exceeds the true value). No subsampling means the
        # composition is exactly a Gaussian mechanism with sensitivity sqrt(n), so the exact
        # closed form is the reference: ours must be >= it and within 1e-4 of it.
        for delta in DELTAS:
            exact = gaussian_epsilon(delta, math.sqrt(n) / sigma)
            eps = ours.epsilon(delta)
            assert exact <= eps <= exact * (1 + 1e-4), (delta, eps, exact)
        return
    pess, opt = _dp_plds(sigma, q, n)
    for delta in DELTAS:
        eps = ours.epsilon(delta)
        ref = pess.get_epsilon_for_delta(delta)
        assert abs(eps / ref - 1) <= 0.01, f"delta={delta}: ours {eps} vs dp_accounting {ref}"
        # "never below dp_accounting's optimistic estimate", checked on the delta side:
        # eps >= eps_opt  <=>  delta_opt(eps) <= delta. (For epsilon > ~745, as at sigma=0.5,
        # q=0.1, n=10^4, dp_accounting's own epsilon search overstates by ~1 through underflow,
        # so its optimistic epsilon is not a lower bound there; its delta side is exact.)
        assert opt.get_delta_for_epsilon(eps) <= delta * (1 + 1e-9), (delta, eps, opt.get_epsilon_for_delta(delta))
        # and our own bracket holds
        lo, hi = ours.epsilon_bounds(delta)
        assert lo <= hi == eps


@pytest.mark.parametrize("sigma,q,n", CELLS, ids=[f"s{s}-q{q}-n{n}" for s, q, n in CELLS])
def test_rdp_matches_dp_accounting(sigma, q, n):
    orders = np.array(dp_rdp.DEFAULT_RDP_ORDERS, dtype=float)
    ours = RDPAccountant(orders=orders).step(sigma, q, n)
    ref_acc = dp_rdp.RdpAccountant()
    ref_acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n
        )
    )
    theirs_rdp = dp_rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, orders)
    ours_rdp = compute_rdp(sigma, q, orders)
    # where both are closed forms (integer orders), they agree to round-off
    integer = (orders == np.round(orders)) & np.isfinite(theirs_rdp)
    np.testing.assert_allclose(ours_rdp[integer], theirs_rdp[integer], rtol=1e-9)
    for delta in DELTAS:
        eps, order = ours.epsilon_and_order(delta)
        ref = ref_acc.get_epsilon(delta)
        # same conversion on the integer orders: identical
        e_int = rdp_to_epsilon(orders[integer], n * ours_rdp[integer], delta)[0]
        r_int = dp_rdp.compute_epsilon(orders[integer], n * theirs_rdp[integer], delta)[0]
        assert e_int == pytest.approx(r_int, rel=1e-9)
        if abs(eps / ref - 1) <= 0.01:
            continue
        # Larger gaps are only allowed where ours is lower because dp_accounting's RDP at a
        # fractional order is too high (its series for small fractional orders stops early,
        # or fails and drops the order) and ours is right, as quadrature shows.
        assert eps < ref, (delta, eps, ref)
        i = int(np.argmin(np.abs(orders - order)))
        assert order != round(order)
        assert not (theirs_rdp[i] <= ours_rdp[i] * (1 + 1e-6)), (order, theirs_rdp[i], ours_rdp[i])
        assert ours_rdp[i] == pytest.approx(rdp_by_quadrature(sigma, q, order), rel=1e-7)


@pytest.mark.parametrize("sigma,q", [(s, q) for s in SIGMAS for q in RATES])
def test_rdp_at_least_pld(sigma, q):
    # Sanity across accountants: both are upper bounds of the same quantity and the PLD one is
    # tight, so RDP can never be (noticeably) below it.
    for n in (1, 100):
        pld = PLDAccountant().step(sigma, q, n)
        rdp = RDPAccountant().step(sigma, q, n)
        for delta in DELTAS:
            assert rdp.epsilon(delta) >= pld.epsilon(delta) * (1 - 1e-4)
