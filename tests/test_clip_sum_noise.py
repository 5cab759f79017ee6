"""clip_sum_noise: Σ_i c_i g_i + σ·z over materialised per-example gradients, both backends."""

from __future__ import annotations

import pytest
import torch

from dpkernels import functional
from dpkernels.ops.philox import PhiloxKey, philox_normal

from helpers import assert_close_scaled
from conftest import triton_runnable

SHAPES = [
    (1, 1),
    (3, 1),
    (1, 7),
    (5, 33),
    (4, 257),  # n past one block of 256 columns
    (20, 7),  # B past one block of 16 rows
    (2, 3, 5),  # a (3, 5) parameter
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(shape, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    per_example = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    c = torch.rand(shape[0], generator=g) * 0.95 + 0.05
    c[0] = 1.0
    return per_example, c.to(device)


def _oracle(per_example, c):
    return torch.einsum("i,i...->...", c.double(), per_example.double())


_close = assert_close_scaled


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_clipped_sum_matches_oracle(device, backend, shape, dtype):
    per_example, c = _inputs(shape, device, dtype)
    out = functional.clip_sum_noise(per_example, c, noise_std=0.0, backend=backend)
    assert out.shape == shape[1:] and out.dtype == dtype and out.device.type == device.type
    _close(out, _oracle(per_example, c), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_noise_is_philox_of_the_key(device, backend, shape, dtype):
    per_example, c = _inputs(shape, device, dtype, seed=1)
    key = PhiloxKey(0xABCDEF0123456789, 77, 5)
    out = functional.clip_sum_noise(per_example, c, noise_std=0.8, generator=key, backend=backend)
    n = per_example[0].numel()
    expected = _oracle(per_example, c) + 0.8 * philox_normal(n, key, device).double().view(shape[1:])
    _close(out, expected, TOL[dtype])


def test_backends_agree(device):
    if not triton_runnable(device):
        pytest.skip("Triton cannot run here")
    per_example, c = _inputs((6, 300), device, torch.float32)
    key = PhiloxKey(3, 1, 4)
    a = functional.clip_sum_noise(per_example, c, noise_std=1.0, generator=key, backend="torch")
    b = functional.clip_sum_noise(per_example, c, noise_std=1.0, generator=key, backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_non_contiguous_per_example(device, backend):
    base, c = _inputs((9, 4), device, torch.float32)
    per_example = base.t().contiguous().t()  # (9, 4) with column-major strides
    assert not per_example.is_contiguous()
    _close(functional.clip_sum_noise(per_example, c, backend=backend), _oracle(per_example, c), 1e-5)
    sliced = torch.randn(5, 3, 11, device=device)[:, :, ::2]  # (5, 3, 6) view
    c5 = torch.linspace(0.1, 1.0, 5, device=device)
    _close(functional.clip_sum_noise(sliced, c5, backend=backend), _oracle(sliced, c5), 1e-5)


def test_zero_factors_give_pure_noise(device, backend):
    per_example, _ = _inputs((4, 50), device, torch.float32)
    key = PhiloxKey(11, 2, 3)
    out = functional.clip_sum_noise(
        per_example, torch.zeros(4, device=device), noise_std=3.0, generator=key, backend=backend
    )
    _close(out, 3.0 * philox_normal(50, key, device).double(), 1e-6)


def test_noise_differs_across_keys(device, backend):
    per_example, c = _inputs((2, 1000), device, torch.float32)
    outs = [
        functional.clip_sum_noise(per_example, c, noise_std=1.0, generator=PhiloxKey(1, step, stream), backend=backend)
        for step in (0, 1)
        for stream in (0, 1)
    ]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not bool((outs[i] == outs[j]).any())


def test_scalar_parameter(device, backend):
    per_example = torch.randn(5, device=device)  # per-example gradients of a 0-d parameter
    c = torch.linspace(0.2, 1.0, 5, device=device)
    out = functional.clip_sum_noise(per_example, c, backend=backend)
    assert out.shape == ()
    _close(out, _oracle(per_example, c), 1e-5)
