"""linear_sq_norms against the torch.func oracle: every method, bias on/off, both backends.

A wrong per-example norm is a wrong clip factor, i.e. a privacy leak, so the norms are
checked on the shapes where tiled kernels go wrong: B = 1, T = 1, sizes that are not
multiples of the tiles (1, 7, 33, 45), T spanning several ghost tiles, p and d spanning
several direct tiles, 3-D and 4-D inputs, non-contiguous views, and half precision.
"""

from __future__ import annotations

import pytest
import torch

from dpkernels import functional
from oracle import LINEAR_CASES as CASES
from oracle import linear_sq_norms_oracle
from oracle import make_linear_inputs as make_inputs

METHODS = ["ghost", "direct", "auto"]
HALF_CASES = ["2d:3x7x33", "3d:2x70x7x33", "3d:2x5x70x75", "3d_strided:3x9x33x45"]


def _check(out, x, g, bias, rtol):
    ref = linear_sq_norms_oracle(x, g, bias)
    assert out.dtype == torch.float32
    assert out.shape == (x.shape[0],)
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=rtol, atol=rtol * 1e-3 * float(ref.max()))


def test_inputs_are_what_the_cases_say():
    assert not make_inputs("2d_transposed:4x33x7", "cpu")[0].is_contiguous()
    x, g = make_inputs("3d_strided:3x9x33x45", "cpu")
    assert not x.is_contiguous() and not g.is_contiguous() and x.shape == (3, 9, 33)
    x, g = make_inputs("4d_permuted:2x3x5x7x45", "cpu")
    assert x.shape == (2, 3, 5, 7) and g.shape == (2, 3, 5, 45) and not x.is_contiguous()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES)
def test_float32_matches_oracle(device, backend, case, bias, method):
    torch.manual_seed(0)
    x, g = make_inputs(case, device)
    out = functional.linear_sq_norms(x, g, bias=bias, method=method, backend=backend)
    _check(out, x, g, bias, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_half_precision_matches_oracle_on_rounded_inputs(device, backend, case, dtype, method):
    # products of half values are exact in float32 and accumulation is float32, so the norms of
    # the rounded inputs come out to float32-ish accuracy; the bound leaves room for GPU dots
    x, g = make_inputs(case, device, dtype)
    out = functional.linear_sq_norms(x, g, bias=True, method=method, backend=backend)
    _check(out, x, g, True, rtol=2e-3)


@pytest.mark.parametrize("case", CASES)
def test_methods_agree(device, backend, case):
    x, g = make_inputs(case, device)
    outs = [functional.linear_sq_norms(x, g, method=m, backend=backend) for m in METHODS]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("case", ["3d:3x7x33x45", "2d:5x70x75", "4d:2x3x5x7x45"])
def test_backends_agree(device, case):
    from conftest import triton_runnable

    if not triton_runnable(torch.device(device)):
        pytest.skip("Triton cannot run here")
    x, g = make_inputs(case, device)
    for m in METHODS:
        a = functional.linear_sq_norms(x, g, method=m, backend="torch")
        b = functional.linear_sq_norms(x, g, method=m, backend="triton")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0.0)


def test_bias_term_is_the_difference(device, backend):
    x, g = make_inputs("3d:3x7x33x45", device)
    with_b = functional.linear_sq_norms(x, g, bias=True, method="ghost", backend=backend)
    without = functional.linear_sq_norms(x, g, bias=False, method="direct", backend=backend)
    torch.testing.assert_close(
        (with_b - without).double().cpu(), g.double().sum(1).square().sum(1).cpu(), rtol=1e-4, atol=1e-4
    )


def test_zero_gradient_example_has_zero_norm(device, backend):
    x, g = make_inputs("3d:3x70x7x33", device)
    g[1] = 0.0
    for m in METHODS:
        out = functional.linear_sq_norms(x, g, method=m, backend=backend)
        assert out[1].item() == 0.0 and bool((out[[0, 2]] > 0).all())


def test_empty_sequence_has_zero_norms(device, backend):
    x = torch.randn(2, 0, 5, device=device)
    g = torch.randn(2, 0, 7, device=device)
    for m in METHODS:
        assert torch.equal(functional.linear_sq_norms(x, g, method=m, backend=backend), torch.zeros(2, device=device))


def test_does_not_modify_inputs(device, backend):
    x, g = make_inputs("3d_strided:3x9x33x45", device)
    x0, g0 = x.clone(), g.clone()
    for m in METHODS:
        functional.linear_sq_norms(x, g, method=m, backend=backend)
    assert torch.equal(x, x0) and torch.equal(g, g0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(4, 300, 512, 384), (3, 130, 96, 200), (2, 257, 33, 1000)])
def test_autotuned_kernels_on_gpu(shape, dtype, monkeypatch):
    """GPU only: the autotuned tilings (the first call of a shape tunes, later calls reuse) agree with the oracle."""
    monkeypatch.setenv("DPKERNELS_AUTOTUNE", "1")
    B, T, d, p = shape
    gen = torch.Generator().manual_seed(B * T)
    x = (torch.randn(B, T, d, generator=gen) / d**0.5).to("cuda", dtype)
    g = (torch.randn(B, T, p, generator=gen) / T).to("cuda", dtype)
    ref = linear_sq_norms_oracle(x, g, True)
    for method in ("ghost", "direct"):
        for _ in range(2):  # tuning call, then a cached-config call
            out = functional.linear_sq_norms(x, g, method=method, backend="triton")
            torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=2e-3, atol=0.0)


@pytest.mark.parametrize("d", [32, 63, 64, 128])
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_bias_column_on_a_tile_boundary(device, backend, d, method):
    """The direct kernel reads x as [x, 1]: with d a multiple of the tile width the bias column
    opens a tile of its own, which must be counted once and only once."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(2, 19, d, generator=gen).to(device)
    g = torch.randn(2, 19, 40, generator=gen).to(device)
    ref = linear_sq_norms_oracle(x, g, True)
    out = functional.linear_sq_norms(x, g, bias=True, method=method, backend=backend)
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=1e-5, atol=1e-6)
