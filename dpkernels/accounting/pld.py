"""Privacy loss distribution (PLD) accountant for DP-SGD: tight (epsilon, delta) with a rigorous upper bound.

Setting
-------
One DP-SGD step is the Poisson-subsampled Gaussian mechanism: every example joins the batch
independently with probability ``q`` (the sample rate), the clipped per-example gradients (L2 norm
<= C) are summed and Gaussian noise N(0, (sigma C)^2) is added. Adjacency is **add/remove-one**:
neighbouring datasets differ by the presence of one example. Projected on the direction of the
differing example and scaled by C, the worst case of one step is the pair of distributions on
the real line

    remove:  P = (1-q) N(0, s^2) + q N(1, s^2),   Q = N(0, s^2)     (s = sigma)
    add:     P = N(0, s^2),   Q = (1-q) N(0, s^2) + q N(1, s^2)

A mechanism is (epsilon, delta)-DP iff, for both directions, the hockey-stick divergence

    delta(epsilon) = sup_S P(S) - e^epsilon Q(S) = E_{y~P}[(1 - e^(epsilon - L(y)))_+],
    L(y) = log P(y)/Q(y)  (the privacy loss),

is at most delta. For T steps (heterogeneous ones included) the losses add up: the composed
loss is the sum of independent per-step losses, so its distribution (the PLD) under P is the
convolution of the per-step PLDs. Each direction is composed on its own and the two
resulting curves are combined by a max at the end, as in Zhu, Dong & Wang (AISTATS 2022).

Discretisation ("connect the dots", Doroshenko et al. 2022)
------------------------------------------------------------
Losses are put on the lattice ``{i h}`` (``h`` = the discretisation interval). The loss of one
step is monotone in y, so the lattice interval (i h, (i+1) h] is the image of a y-interval
whose masses p_i = P(...) and r_i = Q(...) are differences of normal CDFs. Pessimistic
estimate: each interval's P-mass is split between its two end points, b_i at (i+1) h and
a_i = p_i - b_i at i h, so that both its P-mass and its Q-mass are kept:

    b_i = (p_i - e^(i h) r_i) / (1 - e^(-h)).

The resulting discrete pair has the exact delta(epsilon) of the true pair at every lattice
point and is linear in e^epsilon in between; the true curve is convex in e^epsilon, so the
discrete curve lies above it everywhere and, by Blackwell's theorem, the composed discrete
pair dominates the composed true pair: its delta is an upper bound, and it is tight to
second order in ``h`` (no drift of order T h, unlike rounding every loss up). Mass of the
single step beyond ``_Z`` noise standard deviations (about 1e-23) goes to the top lattice
point's "infinite loss" atom (below: to the lowest lattice point). Optimistic estimate:
every loss is rounded *down* to the lattice ("privacy buckets"); since the composed loss
only decreases and (1 - e^(epsilon - L))_+ grows with L, this gives a lower bound on delta
(it drifts by about T h / 2 in the loss and is therefore much looser than the upper bound).

Composition and truncation
--------------------------
All steps are composed by one FFT: the spectra of the per-step PMFs are raised to the power
``steps`` (binary exponentiation) and multiplied across segments. The FFT is circular, so
the composed PMF is computed on a window of the loss that holds all but a tiny mass. A
coarse pass (about 4000 lattice points per step) finds the window with Chernoff bounds
P(S >= t) <= exp(K(lambda) - lambda t), K the log-MGF of the discrete per-step PMFs; the
lattice spacing h is the window width / ``target_points`` (per direction), and on the fine
lattice the mass outside the window is bounded again, rigorously (K computed from the fine
PMFs, rounded to the safe side). Mass above the window (<= ~1e-13, usually ~1e-16) is added
to delta; mass that wrapped around can only add to delta and is subtracted from the
optimistic estimate. FFT round-off is bounded by c eps_mach (log2 N + 2 log2 T) ||pmf||_2
sqrt(N) (Higham's 2-norm bound; about 50x what is measured) and added too, and so is a
1e-10 relative allowance on the sums. ``PLDAccountant.error_report()`` lists all of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import fft as _fft
from scipy.special import ndtr

from . import _validation as V
from ._history import AccountantBase

__all__ = ["PLDAccountant", "ComposedPLD", "single_step_pmf"]

_Z = 10.0  # single-step support, in noise standard deviations (tail mass Phi(-10) ~ 7.6e-24)
_DIRECTIONS = ("remove", "add")


# --------------------------------------------------------------------------- one step
def _components(q: float, direction: str):
    """(means, P-weights, Q-weights) of the two Gaussian components of the pair, on an axis
    where the privacy loss L(y) is increasing (the ``add`` pair is mirrored, y = -x)."""
    if direction == "remove":
        return (0.0, 1.0), (1.0 - q, q), (1.0, 0.0)
    return (0.0, -1.0), (1.0, 0.0), (1.0 - q, q)


def _loss(y: np.ndarray, sigma: float, q: float, direction: str) -> np.ndarray:
    """L(y) = log P(y)/Q(y): remove: log(1-q + q e^((2y-1)/(2 s^2))); add: minus the same at -y."""
    s2 = sigma * sigma
    if direction == "remove":
        z = (2.0 * y - 1.0) / (2.0 * s2)
        return z if q == 1.0 else np.logaddexp(math.log1p(-q), math.log(q) + z)
    z = (-2.0 * y - 1.0) / (2.0 * s2)
    return -z if q == 1.0 else -np.logaddexp(math.log1p(-q), math.log(q) + z)


def _inverse_loss(eps: np.ndarray, sigma: float, q: float, direction: str) -> np.ndarray:
    """y with L(y) = eps (the inverse of ``_loss``); -inf / +inf outside the loss's range."""
    s2 = sigma * sigma
    with np.errstate(divide="ignore", invalid="ignore"):
        if direction == "remove":
            u = np.expm1(eps) + q  # e^eps - (1-q)
            y = s2 * (np.log(u) - math.log(q)) + 0.5
            return np.where(u > 0, y, -np.inf)
        u = np.expm1(-eps) + q  # e^-eps - (1-q)
        y = -s2 * (np.log(u) - math.log(q)) - 0.5
        return np.where(u > 0, y, np.inf)


def _normal_masses(t: np.ndarray) -> Tuple[np.ndarray, float, float]:
    """Standard normal masses of the intervals between sorted points ``t``, and the masses below
    t[0] and above t[-1]. Accurate in both tails: with g = Phi(-|t|) (the smaller of the CDF
    and the survival function), an interval left of 0 has mass g[i+1] - g[i], one right of 0
    has g[i] - g[i+1], and one across 0 has 1 - g[i] - g[i+1]."""
    g = ndtr(-np.abs(t))
    left, right = t[:-1] <= 0, t[1:] <= 0
    inner = np.where(right, g[1:] - g[:-1], np.where(left, 1.0 - g[:-1] - g[1:], g[:-1] - g[1:]))
    below = g[0] if t[0] <= 0 else 1.0 - g[0]
    above = g[-1] if t[-1] > 0 else 1.0 - g[-1]
    return np.maximum(inner, 0.0), float(below), float(above)


@dataclass
class StepPMF:
    """A discrete privacy loss distribution: P-mass ``mass[k]`` at loss ``(offset + k) * h``
    and P-mass ``inf_mass`` at loss +inf (counts fully into delta)."""

    offset: int
    mass: np.ndarray
    inf_mass: float
    h: float


def _support(sigma: float, q: float, direction: str) -> Tuple[float, float]:
    means, _, _ = _components(q, direction)
    y = np.array([min(means) - _Z * sigma, max(means) + _Z * sigma])
    lo, hi = _loss(y, sigma, q, direction)
    return float(lo), float(hi)


def single_step_pmf(
    sigma: float,
    q: float,
    h: float,
    direction: str = "remove",
    pessimistic: bool = True,
    loss_range: Tuple[float, float] = (-math.inf, math.inf),
) -> StepPMF:
    """Discretise the privacy loss of one Poisson-subsampled Gaussian step on the lattice h Z.

    ``pessimistic=True``: connect-the-dots split (module docstring), an upper bound on delta
    after any composition. ``pessimistic=False``: losses rounded down, a lower bound.
    ``loss_range``: the lattice covers at most this range; the P-mass below it is moved up to
    its lowest point and the mass above it to +inf (pessimistic) or to its top point
    (optimistic), which keeps either bound valid (used to skip losses that cannot matter).
    """
    lo, hi = _support(sigma, q, direction)
    lo, hi = max(lo, loss_range[0]), min(hi, loss_range[1])
    i_lo = math.floor(lo / h)
    i_hi = max(math.ceil(hi / h), i_lo + 1)
    eps = np.arange(i_lo, i_hi + 1, dtype=np.float64) * h
    y = _inverse_loss(eps, sigma, q, direction)
    means, wp, wq = _components(q, direction)
    n = len(eps)
    p = np.zeros(n - 1)
    num = np.zeros(n - 1)  # p_i - e^(eps_i) r_i, accumulated per component
    below = above = 0.0
    e_eps = np.exp(np.minimum(eps[:-1], 700.0))
    for mu, a, b in zip(means, wp, wq):
        if a == 0.0 and b == 0.0:
            continue
        inner, lo_mass, hi_mass = _normal_masses((y - mu) / sigma)
        p += a * inner
        num += (a - b * e_eps) * inner
        below += a * lo_mass
        above += a * hi_mass
    mass = np.zeros(n)
    if pessimistic:
        upper = np.clip(num / -math.expm1(-h), 0.0, p)
        mass[:-1] += p - upper
        mass[1:] += upper
        mass[0] += below
        inf_mass = above
    else:
        mass[:-1] += p
        mass[-1] += above
        inf_mass = 0.0
    return StepPMF(i_lo, mass, float(inf_mass), h)


# --------------------------------------------------------------------------- tails
_LAMBDAS = np.geomspace(1e-3, 1e8, 89)
_ALL_LAMBDAS = np.concatenate([-_LAMBDAS[::-1], _LAMBDAS])


def _log_mgf(pmf: StepPMF, lambdas: np.ndarray) -> np.ndarray:
    """K(lambda) = log sum_k mass_k e^(lambda loss_k) (the +inf atom excluded), per lambda."""
    nz = np.flatnonzero(pmf.mass)
    loss = (pmf.offset + nz) * pmf.h
    m = pmf.mass[nz]
    lambdas = np.asarray(lambdas, dtype=np.float64)
    if len(loss) * len(lambdas) <= 1 << 22:  # small: one matrix
        x = lambdas[:, None] * loss[None, :]
        mx = x.max(axis=1)
        return np.log(np.exp(np.maximum(x - mx[:, None], -700.0)) @ m) + mx
    out = np.empty(len(lambdas))
    for i, lam in enumerate(lambdas):
        x = lam * loss
        mx = x.max()
        out[i] = math.log(float(np.exp(np.maximum(x - mx, -700.0)) @ m)) + mx  # no slow subnormals
    return out


def _support_sum(parts: Sequence[Tuple[StepPMF, int]]) -> Tuple[float, float]:
    smin = smax = 0.0
    for pmf, count in parts:
        nz = np.flatnonzero(pmf.mass)
        smin += count * (pmf.offset + nz[0]) * pmf.h
        smax += count * (pmf.offset + nz[-1]) * pmf.h
    return smin, smax


def _window(parts: Sequence[Tuple[StepPMF, int]], tail: float, lambdas: np.ndarray = _ALL_LAMBDAS):
    """Chernoff window of the composed loss S = sum of the parts' losses: P(S >= t) <=
    exp(K(lambda) - lambda t) for lambda > 0 and P(S <= t) <= exp(K(lambda) - lambda t) for
    lambda < 0, with K the sum of the parts' log-MGFs. Returns (t_lo, t_hi, lam_lo, lam_hi):
    the window outside which at most ``tail`` mass lies on each side, and the lambdas that
    gave each end (clipped to the support of S, where the bound is not needed), and K."""
    K = np.zeros(len(lambdas))
    for pmf, count in parts:
        K += count * _log_mgf(pmf, lambdas)
    smin, smax = _support_sum(parts)
    log_tail = math.log(tail)
    pos, neg = lambdas > 0, lambdas < 0
    hi = (K[pos] - log_tail) / lambdas[pos]
    lo = (K[neg] - log_tail) / lambdas[neg]
    i_hi, i_lo = int(np.argmin(hi)), int(np.argmax(lo))
    return (
        max(smin, float(lo[i_lo])),
        min(smax, float(hi[i_hi])),
        float(lambdas[neg][i_lo]),
        float(lambdas[pos][i_hi]),
        K,
    )


def _log_mgf_bound(pmf: StepPMF, lam: float, count: int) -> float:
    """An upper bound on K(lambda) that is cheap on fine lattices: runs of ``step`` lattice points
    are summed and put at their worst end (top for lambda > 0, bottom for lambda < 0), with
    ``step`` small enough that the rounding moves the composed Chernoff bound by at most a
    factor e^(1/4) (|lambda| * step * h * count <= 1/4)."""
    m = pmf.mass
    step = max(1, int(0.25 / (abs(lam) * pmf.h * max(count, 1))))
    if step > 1:
        starts = np.arange(0, len(m), step)
        sums = np.add.reduceat(m, starts)
        idx = np.minimum(starts + (step - 1), len(m) - 1) if lam > 0 else starts
    else:
        sums, idx = m, np.arange(len(m))
    x = lam * ((pmf.offset + idx) * pmf.h)
    mx = float(np.max(x[sums > 0]))
    return math.log(float(np.exp(np.maximum(x - mx, -700.0)) @ sums)) + mx  # no slow subnormals


def _tail_mass_bounds(
    parts: Sequence[Tuple[StepPMF, int]], lambdas: Sequence[float], below: float, above: float
) -> Tuple[float, float]:
    """Chernoff bounds on the composed P-mass at losses <= ``below`` and >= ``above``."""
    smin, smax = _support_sum(parts)
    if below < smin and above > smax:  # the window holds the whole support
        return 0.0, 0.0
    lo = hi = 1.0
    for lam in lambdas:
        if (lam > 0 and above > smax) or (lam < 0 and below < smin):
            continue
        K = sum(count * _log_mgf_bound(pmf, lam, count) for pmf, count in parts)
        if lam > 0:
            hi = min(hi, math.exp(min(0.0, K - lam * above)))
        elif lam < 0:
            lo = min(lo, math.exp(min(0.0, K - lam * below)))
    return (0.0 if below < smin else lo), (0.0 if above > smax else hi)


# --------------------------------------------------------------------------- composition
def _power(x: np.ndarray, n: int) -> np.ndarray:
    """x**n elementwise for complex x and integer n >= 1 by repeated squaring (log2(n) roundings)."""
    result = None
    base = x
    while n:
        if n & 1:
            result = base.copy() if result is None else result * base
        n >>= 1
        if n:
            base = base * base
    return result


def _discounted_suffix_sums(w: np.ndarray, h: float) -> np.ndarray:
    """S_k = sum_{j >= k} w_j e^{-(j-k) h} for nonnegative w, without overflow or cancellation:
    blocks of B points (B h <= 30) get local suffix sums of w_j e^{-(j-a) h} (a = block start),
    and each block adds the (discounted) total of the blocks after it."""
    n = len(w)
    B = int(max(1, min(n, 30.0 // h)))
    nb = -(-n // B)
    W = np.zeros(nb * B)
    W[:n] = w
    W = W.reshape(nb, B)
    e = np.exp(-h * np.arange(B))
    local = np.cumsum((W * e)[:, ::-1], axis=1)[:, ::-1] / e  # sum_{j>=k in block} w_j e^{-(j-k)h}
    carry = np.zeros(nb)  # S at the start of the next block
    for b in range(nb - 2, -1, -1):
        carry[b] = local[b + 1, 0] + math.exp(-h * B) * carry[b + 1]
    S = local + carry[:, None] * np.exp(-h * (B - np.arange(B)))[None, :]
    return S.ravel()[:n]


#: relative allowance for float summation error in delta (numpy's cumulative sums over up to
#: ~10^6 points: at most ~1e-10 even when every rounding goes the same way)
_SUM_RTOL = 1e-10


@dataclass
class ComposedPLD:
    """The composed PLD of one direction: P-mass ``mass[k]`` at loss ``(offset + k) * h`` plus
    ``inf_mass`` at +inf; ``tail_hi`` / ``tail_lo`` bound the mass cut off above / below the
    window (``tail_hi`` is counted into the pessimistic delta)."""

    offset: int
    mass: np.ndarray
    inf_mass: float
    h: float
    tail_hi: float
    tail_lo: float
    pessimistic: bool
    float_error: float = 0.0

    @property
    def losses(self) -> np.ndarray:
        return (self.offset + np.arange(len(self.mass))) * self.h

    def _extra(self) -> float:
        """What delta gets added (pessimistic) or loses (optimistic) for truncation and round-off."""
        if self.pessimistic:
            return self.inf_mass + self.tail_hi + self.float_error
        return self.inf_mass - self.tail_hi - self.tail_lo - self.float_error

    def delta(self, epsilon: float) -> float:
        """delta(epsilon) = inf_mass + sum_{loss_k > epsilon} mass_k (1 - e^(epsilon - loss_k))."""
        L = self.losses
        sel = L > epsilon
        val = float(np.sum(self.mass[sel] * -np.expm1(epsilon - L[sel])))
        val *= (1 + _SUM_RTOL) if self.pessimistic else (1 - _SUM_RTOL)
        return float(min(1.0, max(0.0, val + self._extra())))

    def epsilon(self, delta: float) -> float:
        """Smallest epsilon with delta(epsilon) <= delta (-inf if every epsilon works; +inf if none)."""
        c = self._extra()
        if c >= delta:
            return math.inf
        # solve for the delta that, with the summation allowance, is exactly the target
        delta = (delta - c) / ((1 + _SUM_RTOL) if self.pessimistic else (1 - _SUM_RTOL))
        c = 0.0
        m = self.mass
        # tail sums over j > k: M_k = sum m_j, T_k = sum m_j e^{-(j-k) h}; delta_k = c + M_k - T_k
        M = np.concatenate([np.cumsum(m[::-1])[::-1][1:], [0.0]])
        r = math.exp(-self.h)
        T = r * _discounted_suffix_sums(np.concatenate([m[1:], [0.0]]), self.h)
        d = c + M - T
        above = np.flatnonzero(d >= delta)
        if len(above) == 0:  # even at the lowest loss of the window, delta is met
            return -math.inf
        k = int(above[-1])
        if T[k] <= 0:
            return float(self.losses[k])
        x = (c + M[k] - delta) / T[k]  # delta(eps) = c + M_k - e^{eps - eps_k} T_k on [eps_k, eps_k+1)
        return float(self.losses[k] + math.log(x)) if x > 0 else float(self.losses[k])


def compose(
    parts: Sequence[Tuple[StepPMF, int]],
    window: Optional[Tuple[float, float]] = None,
    lambdas: Optional[Sequence[float]] = None,
    tail: float = 1e-15,
    max_points: int = 1 << 23,
) -> ComposedPLD:
    """Compose ``count`` copies of each PMF (all on the same lattice) by one FFT.

    ``window``: the loss range to compute (default: the Chernoff window for ``tail``, found
    over a wide grid of lambdas); ``lambdas``: the Chernoff parameters used to bound the mass
    outside it (default: those that gave the window). The window is widened while those
    bounds exceed 100 * ``tail``.
    """
    h = parts[0][0].h
    smin, smax = _support_sum(parts)
    if window is not None and not (max(window[0], smin) < min(window[1], smax)):
        window = None  # a guessed window that misses the support: find the real one
    if window is None or lambdas is None:
        t_lo, t_hi, lam_lo, lam_hi, _ = _window(parts, tail)
        window = window or (t_lo, t_hi)
        lambdas = lambdas if lambdas is not None else (lam_lo, lam_hi)
    t_lo, t_hi = window
    for _ in range(6):
        k_lo = math.floor(max(t_lo, smin) / h + 1e-9)
        k_hi = math.ceil(min(t_hi, smax) / h - 1e-9)
        size = k_hi - k_lo + 1
        if size > max_points:
            raise MemoryError(
                f"the composed PLD needs {size} lattice points (> {max_points}): "
                "use a larger value_discretization_interval"
            )
        N = _fft.next_fast_len(size, real=True)
        tail_lo, tail_hi = _tail_mass_bounds(parts, lambdas, (k_lo - 1) * h, (k_lo + N) * h)
        if tail_lo <= 100 * tail and tail_hi <= 100 * tail:
            break
        width = t_hi - t_lo
        t_lo -= 0.5 * width if tail_lo > 100 * tail else 0.0
        t_hi += 0.5 * width if tail_hi > 100 * tail else 0.0
    log_keep = sum(count * math.log1p(-p.inf_mass) if p.inf_mass < 1 else -math.inf for p, count in parts)
    if len(parts) == 1 and parts[0][1] == 1:  # one step: nothing to convolve, no round-off
        pmf = parts[0][0]
        out = np.zeros(N)
        a, b = max(k_lo, pmf.offset), min(k_lo + N, pmf.offset + len(pmf.mass))
        out[a - k_lo : b - k_lo] = pmf.mass[a - pmf.offset : b - pmf.offset]
        return ComposedPLD(k_lo, out, -math.expm1(log_keep), h, tail_hi, tail_lo, True, 0.0)
    spectrum = None
    offset = 0
    for pmf, count in parts:
        m = pmf.mass
        if len(m) > N:  # fold: the FFT is circular anyway
            m = np.concatenate([m, np.zeros((-len(m)) % N)]).reshape(-1, N).sum(axis=0)
        Fn = _power(_fft.rfft(m, N), count)
        spectrum = Fn if spectrum is None else spectrum * Fn
        offset += count * pmf.offset
    out = _fft.irfft(spectrum, N)
    out = np.roll(out, (offset - k_lo) % N)
    np.maximum(out, 0.0, out=out)
    # FFT round-off: the FFT, the log2(steps) products and the inverse FFT each err by
    # O(log2(N) eps_mach) in 2-norm relative to the result (Higham, "Accuracy and Stability of
    # Numerical Algorithms", Sec. 24.1), and delta sums at most N points with weights in
    # [0, 1], so |error in delta| <= c eps_mach (log2 N + 2 log2 steps) ||out||_2 sqrt(N);
    # c = 4 with an 8-ulp allowance bounds what is measured against direct convolution
    # (about 50x below it).
    total = sum(count for _, count in parts)
    l2 = math.sqrt(float(np.dot(out, out)))
    float_error = 4 * 2.3e-16 * (8 + math.log2(N) + 2 * math.log2(max(total, 1))) * l2 * math.sqrt(N)
    return ComposedPLD(k_lo, out, -math.expm1(log_keep), h, tail_hi, tail_lo, True, float_error)


# --------------------------------------------------------------------------- accountant
class PLDAccountant(AccountantBase):
    """Tight privacy accountant for DP-SGD built on the privacy loss distribution.

    Adjacency is add/remove-one; both the "remove" and the "add" pair of every step are
    composed separately and the worse of the two is reported. ``epsilon(delta)`` and
    ``delta(epsilon)`` are **pessimistic**: upper bounds on the true values of the composed
    mechanism (truncated tails and float round-off included), within about 1e-5 relative of
    them on the tested grid. ``epsilon_bounds`` / ``delta_bounds`` add the optimistic
    (lower-bound) estimate, and ``error_report`` states the discretisation interval, the
    truncated masses and the round-off bound that were used.

    Args:
        value_discretization_interval: the lattice spacing h of the loss. ``None`` (default)
            chooses it per query so that the composed PLD spans about ``target_points``
            lattice points (finer for small epsilon, coarser for huge ones).
        target_points: the FFT size aimed at when h is chosen automatically.
        tail_bound: mass allowed outside the composed window on each side.
    """

    kind = "pld"

    def __init__(
        self,
        value_discretization_interval: Optional[float] = None,
        target_points: int = 1 << 18,
        tail_bound: float = 1e-15,
    ) -> None:
        super().__init__()
        if value_discretization_interval is not None:
            value_discretization_interval = V._real("value_discretization_interval", value_discretization_interval)
            if not (0 < value_discretization_interval < 1):
                raise ValueError("value_discretization_interval must be in (0, 1)")
        self.value_discretization_interval = value_discretization_interval
        self.target_points = int(target_points)
        self.tail_bound = float(tail_bound)
        self._cache: Dict[bool, Dict[str, ComposedPLD]] = {}

    def _config(self):
        return {
            "value_discretization_interval": self.value_discretization_interval,
            "target_points": self.target_points,
            "tail_bound": self.tail_bound,
        }

    def _load_config(self, config):
        self.value_discretization_interval = config.get("value_discretization_interval")
        self.target_points = int(config.get("target_points", self.target_points))
        self.tail_bound = float(config.get("tail_bound", self.tail_bound))

    def _invalidate(self) -> None:
        self._cache = {}

    # -- discretisation interval and window -------------------------------------------
    def _plan(self, direction: str):
        """A coarse pass (about 4000 lattice points per step and segment) estimates the window
        of the composed loss of one direction; the lattice spacing h is then chosen so that
        the window spans ``target_points`` points (each direction gets its own h). Returns h,
        the window (widened by 5%), the Chernoff parameters that gave its ends, and for each
        segment the single-step loss range that can still reach the window."""
        parts, supports = [], []
        for seg in self._history:
            lo, hi = _support(seg.noise_multiplier, seg.sample_rate, direction)
            supports.append((lo, hi))
            hc = max((hi - lo) / 4096, 1e-12)
            parts.append((single_step_pmf(seg.noise_multiplier, seg.sample_rate, hc, direction), seg.steps))
        t_lo, t_hi, lam_lo, lam_hi, _ = _window(parts, self.tail_bound)
        margin = 0.05 * (t_hi - t_lo)
        t_lo, t_hi = t_lo - margin, t_hi + margin
        h = self.value_discretization_interval
        if h is None:
            h = max((t_hi - t_lo) / self.target_points, 1e-10)
        total_lo = sum(s.steps * lo for s, (lo, _) in zip(self._history, supports))
        total_hi = sum(s.steps * hi for s, (_, hi) in zip(self._history, supports))
        n = self.steps
        ranges = [(t_lo - (total_hi - hi) - (n + 2) * h, t_hi - (total_lo - lo) + (n + 2) * h) for (lo, hi) in supports]
        return h, (t_lo, t_hi), [lam_lo, lam_hi], ranges

    def _composed(self, pessimistic: bool = True) -> Dict[str, ComposedPLD]:
        if pessimistic in self._cache:
            return self._cache[pessimistic]
        if not self._history:
            raise ValueError("no steps recorded yet: call step() first")
        out = {}
        for direction in _DIRECTIONS:
            h, window, lambdas, ranges = self._plan(direction)
            parts = [
                (single_step_pmf(s.noise_multiplier, s.sample_rate, h, direction, pessimistic, r), s.steps)
                for s, r in zip(self._history, ranges)
            ]
            c = compose(parts, window, lambdas, self.tail_bound)
            if c.tail_hi + c.tail_lo > 1e3 * self.tail_bound:
                # the coarse pass misjudged the window (possible when h is large against the
                # spread of one step): redo it from the fine PMFs, without cutting their range
                parts = [
                    (single_step_pmf(s.noise_multiplier, s.sample_rate, h, direction, pessimistic), s.steps)
                    for s in self._history
                ]
                c = compose(parts, None, None, self.tail_bound)
            c.pessimistic = pessimistic
            out[direction] = c
        self._cache[pessimistic] = out
        return out

    # -- queries ------------------------------------------------------------------
    def epsilon(self, delta: float) -> float:
        """Pessimistic (upper-bound) epsilon of the recorded history at ``delta``
        (add/remove-one adjacency, worse of the two directions); ``inf`` if unattainable."""
        delta = V.check_delta(delta)
        if not self._history:
            return 0.0
        return max(0.0, max(c.epsilon(delta) for c in self._composed(True).values()))

    def delta(self, epsilon: float) -> float:
        """Pessimistic (upper-bound) delta of the recorded history at ``epsilon``."""
        epsilon = V.check_epsilon(epsilon)
        if not self._history:
            return 0.0
        return max(c.delta(epsilon) for c in self._composed(True).values())

    def epsilon_bounds(self, delta: float) -> Tuple[float, float]:
        """(optimistic, pessimistic) epsilon: the true epsilon of the discretised-away
        continuous mechanism lies in between."""
        delta = V.check_delta(delta)
        if not self._history:
            return 0.0, 0.0
        lo = max(0.0, max(c.epsilon(delta) for c in self._composed(False).values()))
        return lo, self.epsilon(delta)

    def delta_bounds(self, epsilon: float) -> Tuple[float, float]:
        """(optimistic, pessimistic) delta at ``epsilon``."""
        epsilon = V.check_epsilon(epsilon)
        if not self._history:
            return 0.0, 0.0
        lo = max(c.delta(epsilon) for c in self._composed(False).values())
        return lo, self.delta(epsilon)

    def error_report(self) -> Dict[str, object]:
        """The numerical choices behind the pessimistic numbers, per direction: the lattice
        spacing h (``value_discretization_interval``), the composed window and its number of
        points, the mass at infinite loss, the Chernoff bounds on the mass cut off above and
        below the window, and the bound on FFT round-off. ``delta_added`` is what every
        reported delta includes for truncation and round-off (infinite-loss mass + mass above
        the window + round-off); the discretisation itself only ever rounds up (see the
        module docstring), and ``epsilon_bounds`` measures how much."""
        comp = self._composed(True)
        rep: Dict[str, object] = {}
        added = 0.0
        for direction, c in comp.items():
            rep["value_discretization_interval"] = max(rep.get("value_discretization_interval", 0.0), float(c.h))
            rep[f"{direction}_value_discretization_interval"] = float(c.h)
            rep[f"{direction}_window"] = (float(c.offset * c.h), float((c.offset + len(c.mass) - 1) * c.h))
            rep[f"{direction}_points"] = int(len(c.mass))
            rep[f"{direction}_infinity_mass"] = float(c.inf_mass)
            rep[f"{direction}_truncated_mass_above"] = float(c.tail_hi)
            rep[f"{direction}_truncated_mass_below"] = float(c.tail_lo)
            rep[f"{direction}_float_error_bound"] = float(c.float_error)
            added = max(added, c.inf_mass + c.tail_hi + c.float_error)
        rep["delta_added"] = float(added)
        return rep
