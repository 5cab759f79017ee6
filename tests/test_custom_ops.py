"""The dpkernels:: operators (dpkernels/ops/_library.py): registration, fake implementations, and the
two ways a functional op runs (its implementation directly in eager code, the operator when traced).

- ``torch.library.opcheck`` on every op and backend: the schema, the fake implementation against the
  real one (shapes, dtypes, strides' validity), and the op under AOTAutograd with dynamic shapes.
- A functional op compiled with ``fullgraph=True`` returns what it returns eagerly.
- Noise keys are read when the graph runs: a compiled function drawing with a key tensor whose step
  changes in place draws each step's noise with one graph; with a PhiloxKey built from an int step it
  draws each step's noise too (the int is guarded, never a stale constant); with ``generator=None`` it
  draws a fresh key at every call.
"""

from __future__ import annotations

import pytest
import torch

from dpkernels import functional
from dpkernels.ops._library import TABLE
from dpkernels.ops.conv_patches import ConvGeometry
from dpkernels.ops.philox import PhiloxKey, philox_normal


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed))


def _key(step=3, stream=5):
    return PhiloxKey(0x1234_5678_9ABC_DEF0, step, stream).as_tensor()


def _conv_geometry():
    return ConvGeometry.from_args((6, 2, 3, 3), 2, 1, 1, 2, "zeros")


def sample_args(name):
    """Canonical arguments of each op (what the functional API hands it), small and odd-shaped."""
    B, T, d, p = 3, 5, 7, 6
    x, g, c = _rand(B, T, d, seed=1), _rand(B, T, p, seed=2), torch.rand(B, generator=_g(3))
    tokens = torch.randint(0, 11, (B, T), generator=_g(4))
    geo = _conv_geometry()
    cx, cg = _rand(B, 4, 9, 7, seed=5), _rand(B, 6, 5, 4, seed=6)
    return {
        "linear_sq_norms": (x, g, True, "auto"),
        "linear_clipped_grad": (x, g, c, 0.7, _key(), None, True),
        "clip_sum_noise": (_rand(B, 4, 3, seed=7), c, 0.7, _key()),
        "gaussian_noise": ([4, 5], 0.7, _key(), 3, torch.device("cpu"), torch.float32),
        "norm_affine_grads": (
            x,
            g[..., :1].expand(B, T, d).contiguous(),
            None,
            torch.rand(B, T, generator=_g(8)) + 0.5,
            1,
            True,
            True,
            True,
        ),
        "embedding_sq_norms": (tokens, g, 11, 2),
        "embedding_per_example_grads": (tokens, g, 11, -1),
        "embedding_clipped_grad": (tokens, g, c, 11, 2, 0.7, _key(), None),
        "embedding_linear_cross": (tokens, g, _rand(B, 4, p, seed=9), _rand(B, 4, 11, seed=10), 2),
        "linear_linear_cross": (x, g, _rand(B, 2, d, seed=11), _rand(B, 2, p, seed=12)),
        "embedding_embedding_cross": (tokens, g, tokens[:, :2], _rand(B, 2, p, seed=13), -1),
        "conv_sq_norms": (cx, cg, geo.as_list(), "zeros", True, "auto"),
        "conv_clipped_grad": (cx, cg, c, geo.as_list(), "zeros", 0.7, _key(), None, True),
    }[name]


def test_every_op_has_sample_arguments():
    for name in TABLE:
        sample_args(name)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_opcheck(name, backend):
    """Schema, fake implementation and AOTAutograd (dynamic shapes) of each op, on each backend."""
    op = TABLE[name]
    if backend not in op.impls and len(op.impls) > 1:
        pytest.skip(f"{name} has no {backend} implementation")
    torch.library.opcheck(op.op, (*sample_args(name), backend))


@pytest.mark.parametrize("name", sorted(TABLE))
def test_the_operator_computes_what_the_implementation_computes(name, backend):
    """The traced way (the operator) and the eager way (the implementation) of ``KernelOp``."""
    op = TABLE[name]
    if backend not in op.impls and len(op.impls) > 1:
        pytest.skip(f"{name} has no {backend} implementation")
    args = sample_args(name)
    eager_args = [PhiloxKey.from_tensor(a) if i in op.key_args else a for i, a in enumerate(args)]
    eager = op(*eager_args, backend=backend)
    traced = op._traced(args, backend)
    eager, traced = (eager, traced) if isinstance(eager, tuple) else ((eager,), (traced,))
    for a, b in zip(eager, traced):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_meta_tensors_and_fake_mode_go_through_the_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, g = torch.empty(4, 3, 8, device="meta"), torch.empty(4, 3, 5, device="meta")
    assert functional.linear_sq_norms(x, g).shape == (4,)
    w, b = functional.linear_clipped_grad(
        x, g, torch.ones(4, device="meta"), noise_std=1.0, generator=PhiloxKey(1), out_dtype=torch.bfloat16
    )
    assert w.shape == (5, 8) and w.dtype == torch.bfloat16 and b.shape == (5,) and w.is_meta
    with FakeTensorMode():
        x, g = torch.empty(4, 3, 8), torch.empty(4, 3, 5)
        norms = functional.linear_sq_norms(x, g, backend="triton")  # no kernel launch: shapes only
        assert norms.shape == (4,) and norms.dtype == torch.float32


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_compiled_functional_ops_equal_eager():
    x, g, c = _rand(4, 6, 9, seed=20), _rand(4, 6, 7, seed=21), torch.rand(4, generator=_g(22))
    key = PhiloxKey(99, 2, 4)

    def ops(x, g, c):
        norms = functional.linear_sq_norms(x, g)
        w, b = functional.linear_clipped_grad(x, g, c, noise_std=0.3, generator=key)
        gw, gb = functional.layer_norm_per_example_grads(x, g[..., :1].expand_as(x), 9)
        return norms, w, b, gw, gb

    for a, b in zip(ops(x, g, c), _compiled(ops)(x, g, c)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_key_tensor_is_read_when_the_graph_runs():
    """One graph, the step's counter changed in place between calls: each call draws that step's noise."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    key = PhiloxKey(2**63 + 12345, 0, 7).as_tensor()
    draw = _compiled(lambda k: functional.gaussian_noise((3, 5), std=2.0, generator=k))
    draws = []
    for step in range(4):
        key[2] = step
        out = draw(key)
        expected = 2.0 * philox_normal(15, PhiloxKey(2**63 + 12345, step, 7)).view(3, 5)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        draws.append(out)
    assert not any(torch.equal(draws[i], draws[i + 1]) for i in range(3))
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


def test_a_philox_key_from_an_int_step_draws_that_steps_noise():
    per = torch.ones(2, 6)
    c = torch.ones(2)

    def noisy(step):
        return functional.clip_sum_noise(per, c, noise_std=1.0, generator=PhiloxKey(5, step, 1))

    compiled = _compiled(noisy)
    outs = [compiled(step) for step in range(3)]
    for step, out in enumerate(outs):
        torch.testing.assert_close(out, noisy(step), rtol=0, atol=1e-6)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_no_generator_draws_a_fresh_key_at_every_compiled_call():
    """(The key is drawn outside the graph, from the OS CSPRNG: a graph break, never a constant.)"""
    compiled = torch.compile(lambda: functional.gaussian_noise((64,), std=1.0, device="cpu"), backend="aot_eager")
    a, b = compiled(), compiled()
    assert not torch.equal(a, b)


@pytest.mark.parametrize("offset", [0, 1, 2, 1023, 2**33 + 1])
def test_gaussian_noise_offset_on_every_backend(offset, backend):
    """Elements offset .. offset + n − 1 of a key's draw, on the Triton backend too (its kernel takes the
    offset, odd ones starting mid-pair): the slice of the whole draw."""
    key = PhiloxKey(77, 3, 9)
    n = 1500
    whole = philox_normal(offset + n, key) if offset < 2**20 else philox_normal(n, key, offset=offset)
    expected = 0.5 * (whole[offset:] if offset < 2**20 else whole)
    got = functional.gaussian_noise((n,), std=0.5, generator=key, offset=offset, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
