"""Philox-4x32-10 noise: known answers, agreement of the generators, statistics, uniqueness.

Reused or predictable noise is a privacy leak, so this file proves: the block cipher is the
published Philox-4x32-10 (Random123 known-answer vectors); the Triton generator draws the
same normals as the torch reference, also for element indices past 2^32; the normals are
N(0, 1); no two (element, step, stream) counters share a draw; keys are reproducible from a
seed and fresh (unpredictable) without one.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpkernels import functional
from dpkernels.ops._triton import HAS_TRITON, tl, triton
from dpkernels.ops.philox import MASK32, PhiloxKey, philox4x32_10, philox_normal, resolve_key

from conftest import triton_runnable

# ------------------------------------------------------------------ helpers ---------------


def _u32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _counters(idx: torch.Tensor, step: int, stream: int):
    return idx & MASK32, (idx >> 32) & MASK32, torch.full_like(idx, step), torch.full_like(idx, stream)


def _box_muller(x_hi: torch.Tensor, x_lo: torch.Tensor, x_angle: torch.Tensor, use_sin: torch.Tensor) -> torch.Tensor:
    """The documented transform (dpkernels/ops/philox.py), written out again here: the radius
    from the 64-bit uniform x_hi·2^-32 + x_lo·2^-64 + 2^-65, the angle from x_angle."""
    u = x_hi.to(torch.float32) * 2.0**-32 + (x_lo.to(torch.float32) * 2.0**-64 + 2.0**-65)
    angle = (2 * math.pi) * (x_angle.to(torch.float32) * 2.0**-32)
    radius = torch.sqrt(-2.0 * torch.log(u))
    return radius * torch.where(use_sin, torch.sin(angle), torch.cos(angle))


def _normals_at(idx: torch.Tensor, key: PhiloxKey) -> torch.Tensor:
    """Normals of arbitrary (64-bit) element indices under ``key``, from the raw cipher.

    Element e is slot e & 1 of pair e >> 1: slot 0 is R cos θ, slot 1 is R sin θ, with R from
    (x0, x1) and θ from x2; x3 is unused.
    """
    x0, x1, x2, _ = philox4x32_10(*_counters(idx >> 1, key.step, key.stream), key.seed_lo, key.seed_hi)
    return _box_muller(x0, x1, x2, (idx & 1) == 1)


KEYS = [
    PhiloxKey(0),
    PhiloxKey(1, 1, 1),  # value 1: Triton may specialise such arguments
    PhiloxKey(0x243F6A8885A308D3, 7, 3),
    PhiloxKey(2**64 - 1, 2**32 - 1, 2**32 - 1),  # every key/counter word above 2^31
    PhiloxKey(0xFFFFFFFF00000000 | 0x80000001, 2**31, 2**31 + 5),
]

# ------------------------------------------------------------------ known answers ---------

# Random123's kat_vectors for philox4x32_10: (counter, key, expected output)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answer_vectors(counter, key, expected):
    out = philox4x32_10(*[_u32(c) for c in counter], *key)
    assert tuple(int(o) for o in out) == expected


def test_philox_known_answers_batched():
    # the three vectors in one tensor call, with their keys per call: element-wise, no cross-talk
    counters = [_u32(*col) for col in zip(*[c for c, _, _ in KAT])]
    for row, (_, key, expected) in enumerate(KAT):
        out = philox4x32_10(*counters, *key)
        assert tuple(int(o[row]) for o in out) == expected


def test_outputs_are_uint32():
    idx = torch.arange(10_000, dtype=torch.int64) * 7919
    for w in philox4x32_10(*_counters(idx, 2**32 - 1, 2**32 - 1), MASK32, MASK32):
        assert int(w.min()) >= 0 and int(w.max()) <= MASK32


def test_reference_normal_is_box_muller_of_the_counter_scheme():
    key = PhiloxKey(0xDEADBEEF12345678, 11, 4)
    idx = torch.arange(5000, dtype=torch.int64)
    assert torch.equal(philox_normal(5000, key), _normals_at(idx, key))


# ------------------------------------------------------------------ Triton vs reference ---


@pytest.mark.parametrize("key", KEYS, ids=lambda k: f"{k.seed:x}-{k.step}-{k.stream}")
@pytest.mark.parametrize("numel", [1, 1000, 3001])
def test_triton_generator_matches_reference(device, key, numel):
    if not triton_runnable(device):
        pytest.skip("Triton cannot run here")
    from dpkernels.ops._triton import philox_normal_triton

    ref = philox_normal(numel, key, device)
    out = philox_normal_triton(numel, key, device)
    assert out.dtype == torch.float32 and out.shape == (numel,)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


if HAS_TRITON:
    from dpkernels.ops._triton import philox_normal_tl

    @triton.jit
    def _normals_from_kernel(out, base, n, seed_lo, seed_hi, step, stream, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        elem = base + offs.to(tl.int64)
        tl.store(out + offs, philox_normal_tl(elem, seed_lo, seed_hi, step, stream), mask=offs < n)


if HAS_TRITON:
    from dpkernels.ops._triton import philox_normal_pairs_tl

    @triton.jit
    def _pair_normals_from_kernel(out, qbase, seed_lo, seed_hi, step, stream, Q: tl.constexpr):
        pairs = qbase + tl.arange(0, Q).to(tl.int64)
        z = tl.reshape(philox_normal_pairs_tl(pairs[None, :], seed_lo, seed_hi, step, stream), (2 * Q,))
        tl.store(out + tl.arange(0, 2 * Q), z)


@pytest.mark.parametrize("qbase", [0, 2**31 - 8, 2**32 + 3, 2**38])
def test_triton_pair_helper_with_64bit_indices(device, qbase):
    """The GEMM epilogue's paired generator: pair q holds elements 2q, 2q+1, also past 2^32."""
    if not triton_runnable(device):
        pytest.skip("Triton cannot run here")
    key = PhiloxKey(0xFEDCBA9876543210, 2**31 + 1, 3)
    Q = 64
    out = torch.empty(2 * Q, dtype=torch.float32, device=device)
    _pair_normals_from_kernel[(1,)](out, qbase, key.seed_lo, key.seed_hi, key.step, key.stream, Q=Q)
    idx = torch.arange(2 * qbase, 2 * (qbase + Q), dtype=torch.int64)
    torch.testing.assert_close(out.cpu(), _normals_at(idx, key), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", [0, 2**32 - 100, 2**32, 3 * 2**32 + 17, 2**40 - 50])
def test_triton_helper_with_64bit_element_indices(device, base):
    """The kernels' in-register generator handles element indices past 2^32 (c1 = index >> 32)."""
    if not triton_runnable(device):
        pytest.skip("Triton cannot run here")
    key = PhiloxKey(0x0123456789ABCDEF, 5, 9)
    n = 200
    out = torch.empty(n, dtype=torch.float32, device=device)
    _normals_from_kernel[(1,)](out, base, n, key.seed_lo, key.seed_hi, key.step, key.stream, BLOCK=256)
    idx = torch.arange(base, base + n, dtype=torch.int64)
    torch.testing.assert_close(out.cpu(), _normals_at(idx, key), rtol=1e-5, atol=1e-5)


def test_high_word_of_element_index_changes_the_draw():
    """Element i + 2^32·k is a different counter from element i: different output."""
    key = PhiloxKey(99, 3, 2)
    idx = torch.arange(30_000, dtype=torch.int64)
    c0, c1, c2, c3 = _counters(idx, key.step, key.stream)
    low = philox4x32_10(c0, c1, c2, c3, key.seed_lo, key.seed_hi)
    for hi in (1, 2, 2**31, MASK32):
        high = philox4x32_10(c0, torch.full_like(c1, hi), c2, c3, key.seed_lo, key.seed_hi)
        same = (low[0] == high[0]) & (low[1] == high[1])
        assert not bool(same.any())
    # and through the element index itself: + 2^32 (pair + 2^31) and + 2^33 (the pair's c1 = 1)
    base = _normals_at(idx, key)
    for offset in (2**32, 2**33, 2**40):
        assert (_normals_at(idx + offset, key) == base).float().mean() < 1e-3


# ------------------------------------------------------------------ statistics -------------


def test_normals_mean_and_std():
    n = 10**6
    z = philox_normal(n, PhiloxKey(0x5EED, 1, 2)).double()
    se_mean = 1 / math.sqrt(n)
    se_std = 1 / math.sqrt(2 * n)
    assert abs(z.mean().item()) < 5 * se_mean
    assert abs(z.std().item() - 1.0) < 5 * se_std
    # third and fourth moments of N(0,1): 0 and 3
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / n)
    assert abs((z**4).mean().item() - 3.0) < 5 * math.sqrt(96 / n)
    assert bool(torch.isfinite(z).all())


def test_normals_pass_ks_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    z = philox_normal(200_000, PhiloxKey(20240601, 0, 0)).double().numpy()
    assert scipy_stats.kstest(z, "norm").pvalue > 1e-3


def test_normals_tail_frequencies():
    # P(|z| > 3) = 0.0026998; P(|z| > 4) = 6.334e-5
    n = 10**6
    z = philox_normal(n, PhiloxKey(77, 0, 0)).abs()
    for t, p in ((3.0, 0.0026998), (4.0, 6.334e-5)):
        count = int((z > t).sum())
        assert abs(count - n * p) < 5 * math.sqrt(n * p) + 1


def test_counters_never_share_a_draw():
    """4 streams × 4 steps × 10^5 pairs: every radius word pair (x0, x1) is distinct.

    Each pair's normals are R cos θ, R sin θ with R from (x0, x1) and θ from x2. (A 32-bit word
    alone would collide by chance among 10^6 draws, so the 64-bit radius words are what is
    checked. Philox is a bijection of the counter for a fixed key, so the full 128-bit outputs
    are distinct by construction.)
    """
    key = PhiloxKey(0xC0FFEE)
    idx = torch.arange(100_000, dtype=torch.int64)
    words = []
    for step in range(4):
        for stream in range(4):
            x0, x1, _, _ = philox4x32_10(*_counters(idx, step, stream), key.seed_lo, key.seed_hi)
            words.append((x0 << 32) | x1)  # wraps in int64, still one-to-one
    allw = torch.cat(words)
    assert torch.unique(allw).numel() == allw.numel()


def test_tail_reaches_past_nine_standard_deviations():
    """The radius uses a 64-bit uniform: the smallest u is 2^-65, not 2^-33, so the sampler is not
    truncated at 6.8σ (a truncation that would add δ ≈ exp(-(6.76 - 1/σ)²/2) per step)."""
    from dpkernels.ops import philox

    zero = torch.zeros(1, dtype=torch.int64)
    for x_lo, radius in ((0, philox.MAX_RADIUS), (1, math.sqrt(-2 * math.log(1.5 * 2.0**-64)))):
        z = philox._box_muller(zero, torch.full((1,), x_lo, dtype=torch.int64), zero)[0]  # θ = 0: z = R
        assert float(z) == pytest.approx(radius, rel=1e-6)
    assert philox.MAX_RADIUS == pytest.approx(9.4926, abs=1e-4)
    # x0 = 0 is not the end of the range: its 2^32 low words spread u over [2^-65, 2^-32)
    lo = torch.arange(0, 2**32, 2**20, dtype=torch.int64)
    r = philox._box_muller(torch.zeros_like(lo), lo, torch.zeros_like(lo))[0]
    assert float(r.min()) > 6.66 and float(r.max()) == pytest.approx(philox.MAX_RADIUS, rel=1e-6)
    assert bool((r[1:] < r[:-1]).all())  # distinct, decreasing radii: the low word is used


def test_truncation_delta():
    from dpkernels.ops.philox import MAX_RADIUS, truncation_delta

    assert truncation_delta(1.0) == pytest.approx(math.exp(-0.5 * (MAX_RADIUS - 1) ** 2))
    assert truncation_delta(1.0) < 1e-15 and truncation_delta(0.5) < 1e-12
    assert truncation_delta(0.05) == 1.0  # σ so small the shift passes the whole range
    with pytest.raises(ValueError):
        truncation_delta(0.0)


def test_streams_steps_seeds_uncorrelated():
    n = 200_000
    base = PhiloxKey(1234, 5, 6)
    z = philox_normal(n, base).double()
    others = [
        PhiloxKey(1234, 5, 7),  # next stream
        PhiloxKey(1234, 6, 6),  # next step
        PhiloxKey(1235, 5, 6),  # next seed
        PhiloxKey(1234 + 2**32, 5, 6),  # seed differing only in the high word
    ]
    for k in others:
        w = philox_normal(n, k).double()
        corr = torch.corrcoef(torch.stack([z, w]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), k
        assert (z == w).float().mean().item() < 1e-4, k
    # neighbouring elements of one stream are uncorrelated too
    lag = torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()
    assert abs(lag) < 5 / math.sqrt(n)


def test_same_key_reproduces_exactly():
    key = PhiloxKey(42, 3, 1)
    assert torch.equal(philox_normal(12345, key), philox_normal(12345, key))
    # a prefix of a longer draw is the shorter draw: values depend on the element index only
    assert torch.equal(philox_normal(100, key), philox_normal(12345, key)[:100])


# ------------------------------------------------------------------ keys -------------------


def test_resolve_key_none_is_fresh_each_time():
    keys = {resolve_key(None).seed for _ in range(50)}
    assert len(keys) == 50
    k = resolve_key(None)
    assert (k.step, k.stream) == (0, 0) and 0 <= k.seed < 2**64


def test_resolve_key_from_seeded_generator_is_reproducible():
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    a = [resolve_key(g1) for _ in range(3)]
    b = [resolve_key(g2) for _ in range(3)]
    assert a == b
    assert len({k.seed for k in a}) == 3  # successive draws differ
    g3 = torch.Generator().manual_seed(8)
    assert resolve_key(g3) != a[0]
    # keys use the full 64 bits
    seeds = [resolve_key(g1).seed for _ in range(200)]
    assert max(seeds) >= 2**63 and any(s >> 32 for s in seeds)


def test_resolve_key_passes_a_philox_key_through():
    k = PhiloxKey(5, 6, 7)
    assert resolve_key(k) is k


def test_resolve_key_rejects_other_types():
    with pytest.raises(TypeError, match="PhiloxKey"):
        resolve_key(1234)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(seed=-1),
        dict(seed=2**64),
        dict(seed=0, step=-1),
        dict(seed=0, step=2**32),
        dict(seed=0, stream=-1),
        dict(seed=0, stream=2**32),
    ],
)
def test_bad_keys_raise(kwargs):
    with pytest.raises(ValueError, match="PhiloxKey"):
        PhiloxKey(**kwargs)


def test_key_words():
    k = PhiloxKey(0x0123456789ABCDEF)
    assert (k.seed_hi, k.seed_lo) == (0x01234567, 0x89ABCDEF)


# ------------------------------------------------------------------ gaussian_noise ---------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_noise_is_the_counter_scheme(device, backend, dtype):
    key = PhiloxKey(31337, 2, 8)
    out = functional.gaussian_noise((7, 13), std=0.5, generator=key, device=device, dtype=dtype, backend=backend)
    assert out.shape == (7, 13) and out.dtype == dtype and out.device.type == device.type
    ref = (0.5 * philox_normal(91, key, device)).to(dtype).view(7, 13)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_gaussian_noise_zero_std_is_zero(device):
    out = functional.gaussian_noise((3, 4), std=0.0, generator=PhiloxKey(1), device=device)
    assert torch.equal(out, torch.zeros(3, 4, device=device))
