"""Every tile configuration the GPU autotuner may pick computes the right answer.

The autotuner chooses by speed alone, so each candidate in dpkernels.ops._triton._GEMM_TILES
(and the ghost kernel's BLOCK_K choices) is run here directly, on the CPU interpreter, with
shapes that leave partial tiles in every dimension, against the oracle.
"""

from __future__ import annotations

import pytest
import torch

from conftest import triton_runnable
from oracle import linear_clipped_sum_oracle, linear_sq_norms_oracle

from dpkernels.ops import _triton as kt
from dpkernels.ops.philox import PhiloxKey

pytestmark = pytest.mark.skipif(not kt.HAS_TRITON, reason="needs triton")

B, T, D, P = 2, 37, 70, 45  # partial tiles everywhere; D + 1 = 71 columns with the bias


def _inputs(device):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(B, T, D, generator=gen).to(device)
    g = torch.randn(B, T, P, generator=gen).to(device)
    return x, g


@pytest.mark.parametrize("tile", kt._GEMM_TILES, ids=lambda t: "x".join(map(str, t[:3])))
def test_direct_norm_candidate(device, tile):
    if not triton_runnable(device):
        pytest.skip("Triton cannot run here")
    from dpkernels.ops import linear_sq_norms as lsn

    x, g = _inputs(device)
    rows, cols, red, _, _ = tile
    d_cols = D + 1
    out_row = (P + 31) // 32 * ((d_cols + 31) // 32)
    out = torch.zeros((B, out_row), dtype=torch.float32, device=device)
    grid = (B, (P + rows - 1) // rows, (d_cols + cols - 1) // cols)
    lsn._linear_direct_kernel[grid](
        x,
        g,
        out,
        T,
        D,
        P,
        out_row,
        *x.stride(),
        *g.stride(),
        HAS_BIAS=True,
        **kt.dot_flags(x.dtype),
        BLOCK_P=rows,
        BLOCK_D=cols,
        BLOCK_T=red,
    )
    torch.testing.assert_close(
        out.sum(1).double().cpu(), linear_sq_norms_oracle(x, g, True).double().cpu(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("d", [70, 72], ids=["d%4!=0", "d%4==0"])
@pytest.mark.parametrize("tile", kt._GEMM_TILES, ids=lambda t: "x".join(map(str, t[:3])))
def test_clipped_grad_candidate(device, tile, d):
    if not triton_runnable(device):
        pytest.skip("Triton cannot run here")
    from dpkernels.ops import linear_clipped_grad as lcg
    from dpkernels.ops.philox import philox_normal

    x, g = _inputs(device)
    x = torch.cat([x, x[..., : d - D]], dim=-1) if d > D else x
    c = torch.rand(B, device=device) + 0.1
    key = PhiloxKey(11, 2, 3)
    rows, cols, red, _, _ = tile
    out = torch.empty((P, d), dtype=torch.float32, device=device)
    x2, g2 = x.reshape(B * T, d), g.reshape(B * T, P)
    grid = ((P + rows - 1) // rows, (d + cols - 1) // cols)
    lcg._linear_clipped_grad_kernel[grid](
        x2,
        g2,
        c,
        out,
        T,
        B * T,
        d,
        P,
        x2.stride(0),
        g2.stride(0),
        0.5,
        key.seed_lo,
        key.seed_hi,
        key.step,
        key.stream,
        HAS_NOISE=True,
        ALIGNED2=d % 2 == 0,
        **kt.dot_flags(x.dtype),
        BLOCK_P=rows,
        BLOCK_D=cols,
        BLOCK_K=red,
    )
    ref_w, _ = linear_clipped_sum_oracle(x, g, c, True)
    ref = ref_w.double().cpu() + 0.5 * philox_normal(P * d, key).view(P, d).double()
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_partial_sum_kernels_are_zeroed_by_the_autotuner():
    """Kernels that write partial sums into tile-indexed slots are autotuned with Triton's own
    reset_to_zero on their output: a losing tiling's stale slots are zeroed before the winner runs."""
    from dpkernels.ops import conv_sq_norms as cvn
    from dpkernels.ops import linear_sq_norms as lsn

    for launch in (lsn._direct_launch, cvn._conv_direct_launch):
        assert launch.tuned.reset_to_zero == ["out_ptr"]
        assert "out_ptr" in launch.kernel.arg_names


def test_launch_uses_the_fixed_meta_parameters_without_autotuning(monkeypatch):
    calls = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append(("fixed", grid, args, kw))

    class FakeTuned:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append(("tuned", grid, args, kw))

    launch = kt.TunedLaunch.__new__(kt.TunedLaunch)
    launch.kernel, launch.tuned = FakeKernel(), FakeTuned()
    monkeypatch.setattr(kt, "use_autotune", lambda: False)
    launch(lambda meta: (meta["BLOCK"] * 2,), (1, 2), {"F": 3}, fixed={"BLOCK": 16})
    monkeypatch.setattr(kt, "use_autotune", lambda: True)
    launch((7,), (1, 2), {"F": 3}, fixed={"BLOCK": 16})
    assert calls[0] == ("fixed", (32,), (1, 2), {"F": 3, "BLOCK": 16})
    assert calls[1] == ("tuned", (7,), (1, 2), {"F": 3})
