"""Normalisation layers (LayerNorm, RMSNorm, GroupNorm): per-example affine gradients against the
torch.func oracle, the drop-in modules, and private steps through make_private.

The oracle differentiates the torch layer itself (F.layer_norm / F.rms_norm / F.group_norm of
one example) in float64; the package recomputes x̂ from the forward's statistics in a kernel,
so a wrong statistic index (a row's mean applied to another row, a channel's group mixed up)
breaks these equalities.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import grad, vmap

import dpkernels
from dpkernels import functional
from dpkernels.nn import DPGroupNorm, DPLayerNorm, DPRMSNorm

from oracle import flat_clipped_mean, model_per_example_grads

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _oracle(kind: str, x: torch.Tensor, g: torch.Tensor, spec, eps: float):
    """Per-example (weight, bias) gradients of the torch layer, float64."""
    x, g = x.detach().double(), g.detach().double()
    if kind == "group":
        n = x.shape[1]
    else:
        n = 1
        for s in spec:
            n *= s
        n_shape = spec
    w = torch.randn(x.shape[1] if kind == "group" else n_shape, dtype=torch.float64)
    b = torch.randn_like(w)

    def loss(w_, b_, x_i, g_i):
        if kind == "layer":
            y = F.layer_norm(x_i[None], spec, w_, b_, eps)
        elif kind == "rms":
            y = F.rms_norm(x_i[None], spec, w_, eps)
        else:
            y = F.group_norm(x_i[None], spec, w_, b_, eps)
        return (y * g_i[None]).sum()

    gw, gb = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(w, b, x, g)
    return gw, gb


def _inputs(shape, dtype, strided: bool, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # a permuted, non-contiguous view of the same shape
        x = torch.randn(*reversed(shape), generator=gen).permute(*reversed(range(len(shape))))
        g = torch.randn(*reversed(shape), generator=gen).permute(*reversed(range(len(shape))))
    else:
        x = torch.randn(*shape, generator=gen)
        g = torch.randn(*shape, generator=gen)
    x = x * 3 + 1.5  # a mean and a scale that normalisation must remove
    return x.to(device=device, dtype=dtype), g.to(device=device, dtype=dtype)


def _close(out, ref, dtype):
    tol = TOL[dtype]
    scale = float(ref.abs().max())
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=tol, atol=tol * max(scale, 1e-30))


LAYER_CASES = [
    ((1, 5), (5,)),
    ((3, 37, 19), (19,)),
    ((2, 4, 3, 6), (3, 6)),
    ((5, 1, 33), (33,)),
    ((2, 70, 40), (40,)),
    ((1, 300, 5), (5,)),
]  # the last: rows split over programs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("shape,normalized", LAYER_CASES)
def test_layer_norm_per_example_grads(device, backend, shape, normalized, strided, dtype):
    if dtype == torch.float16 and backend == "torch" and strided:
        pytest.skip("covered by the contiguous case")
    x, g = _inputs(shape, dtype, strided, device=device)
    ref_w, ref_b = _oracle("layer", x, g, normalized, 1e-5)
    gw, gb = functional.layer_norm_per_example_grads(x, g, normalized, eps=1e-5, backend=backend)
    assert gw.dtype == torch.float32 and gw.shape == ref_w.shape
    _close(gw, ref_w, dtype)
    _close(gb, ref_b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,normalized", LAYER_CASES)
def test_rms_norm_per_example_grads(device, backend, shape, normalized, dtype):
    x, g = _inputs(shape, dtype, strided=False, seed=1, device=device)
    eps = 1e-6
    ref_w, _ = _oracle("rms", x, g, normalized, eps)
    gw = functional.rms_norm_per_example_grads(x, g, normalized, eps=eps, backend=backend)
    _close(gw, ref_w, dtype)


GROUP_CASES = [((1, 6, 5), 3), ((3, 12, 7, 5), 4), ((2, 9, 2), 9), ((4, 6, 33), 1), ((2, 10, 3, 3, 3), 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("shape,groups", GROUP_CASES)
def test_group_norm_per_example_grads(device, backend, shape, groups, strided, dtype):
    x, g = _inputs(shape, dtype, strided, seed=2, device=device)
    ref_w, ref_b = _oracle("group", x, g, groups, 1e-5)
    gw, gb = functional.group_norm_per_example_grads(x, g, groups, eps=1e-5, backend=backend)
    _close(gw, ref_w, dtype)
    _close(gb, ref_b, dtype)


def test_given_statistics_are_used(device, backend):
    """The forward's statistics, when passed, are the ones x̂ is formed with (rows not mixed up)."""
    x, g = _inputs((3, 9, 11), torch.float32, strided=False, device=device)
    _, mean, rstd = torch.native_layer_norm(x, (11,), None, None, 1e-5)
    got = functional.layer_norm_per_example_grads(x, g, 11, mean=mean, rstd=rstd, backend=backend)
    ref = functional.layer_norm_per_example_grads(x, g, 11, backend="torch")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # a different (wrong) statistic changes the result: the kernel reads what it is given
    off = functional.layer_norm_per_example_grads(x, g, 11, mean=mean + 1, rstd=rstd, backend=backend)[0]
    assert not torch.allclose(off, got[0])


def test_only_the_wanted_gradients():
    x, g = _inputs((2, 5, 7), torch.float32, strided=False)
    gw, gb = functional.layer_norm_per_example_grads(x, g, 7, bias=False, backend="torch")
    assert gw is not None and gb is None
    gw, gb = functional.group_norm_per_example_grads(x, g, 5, weight=False, backend="torch")
    assert gw is None and gb is not None


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, g: functional.layer_norm_per_example_grads(x, g[:, :2], 7), "same shape"),
        (lambda x, g: functional.layer_norm_per_example_grads(x, g.double(), 7), "dtype"),
        (lambda x, g: functional.layer_norm_per_example_grads(x, g, 6), "normalized_shape"),
        (lambda x, g: functional.layer_norm_per_example_grads(x[:0], g[:0], 7), "non-empty batch"),
        (lambda x, g: functional.layer_norm_per_example_grads(x, g, 7, mean=torch.zeros(3)), "mean must"),
        (lambda x, g: functional.layer_norm_per_example_grads(x, g, 7, mean=torch.zeros(10)), "both mean and rstd"),
        (lambda x, g: functional.group_norm_per_example_grads(x, g, 2), "divisor"),
        (lambda x, g: functional.rms_norm_per_example_grads(x.int(), g.int(), 7), "dtype"),
    ],
)
def test_functional_errors(call, match):
    x, g = _inputs((2, 5, 7), torch.float32, strided=False)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, g)


# ------------------------------------------------------------------ modules and the engine --


def _copy_into(dp: nn.Module, ref: nn.Module) -> None:
    dp.load_state_dict(ref.state_dict())


@pytest.mark.parametrize(
    "make,dp_cls",
    [
        (lambda: nn.LayerNorm((3, 6)), DPLayerNorm),
        (lambda: nn.LayerNorm(6, bias=False), DPLayerNorm),
        (lambda: nn.RMSNorm(6, eps=1e-6), DPRMSNorm),
        (lambda: nn.GroupNorm(2, 6), DPGroupNorm),
    ],
)
def test_modules_are_drop_in(make, dp_cls):
    ref = make()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    dp = dpkernels.nn.convert(copy.deepcopy(ref))
    assert type(dp) is dp_cls
    assert dp.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 3, 6) if not isinstance(ref, nn.GroupNorm) else torch.randn(4, 6, 5)
    torch.testing.assert_close(dp(x), ref(x))


def test_layers_without_affine_parameters_are_left_alone():
    for m in (
        nn.LayerNorm(5, elementwise_affine=False),
        nn.RMSNorm(5, elementwise_affine=False),
        nn.GroupNorm(1, 5, affine=False),
    ):
        assert dpkernels.nn.convert(m) is m


class _NormNet(nn.Module):
    """Linear → LayerNorm → GELU → Linear → RMSNorm → mean over T → Linear, plus a GroupNorm branch."""

    def __init__(self, d: int = 6, h: int = 10, out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.ln = nn.LayerNorm(h)
        self.fc2 = nn.Linear(h, h)
        self.rms = nn.RMSNorm(h, eps=1e-6)
        self.gn = nn.GroupNorm(2, h)
        self.head = nn.Linear(h, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, d)
        h = F.gelu(self.ln(self.fc1(x)))
        h = self.rms(self.fc2(h))
        h = self.gn(h.transpose(1, 2)).transpose(1, 2)  # channels h, positions T
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_private_step_matches_the_oracle(device, backend, loss_reduction):
    torch.manual_seed(3)
    model = _NormNet()
    with torch.no_grad():  # affine parameters away from (1, 0) so that a lost gradient shows
        for m in (model.ln, model.rms, model.gn):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    reference = copy.deepcopy(model)
    B, T = 5, 7
    x = torch.randn(B, T, 6)
    y = torch.randint(0, 3, (B,))
    per_example = model_per_example_grads(reference, x, y, "ce")
    _, norms = flat_clipped_mean(per_example, 1.0, B)
    C = float(norms.median())  # some examples clipped, some not

    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt = dpkernels.make_private(
        model,
        opt,
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=B,
        loss_reduction=loss_reduction,
        backend=backend,
    )
    assert isinstance(model.ln, DPLayerNorm) and isinstance(model.rms, DPRMSNorm) and isinstance(model.gn, DPGroupNorm)
    F.cross_entropy(model(x.to(device)), y.to(device), reduction=loss_reduction).backward()
    opt.write_private_grads()
    got = {n: p.grad.double().cpu() for n, p in model.named_parameters()}

    expected, _ = flat_clipped_mean(per_example, C, B)
    for name, ref in expected.items():
        torch.testing.assert_close(got[name], ref, rtol=2e-4, atol=2e-6, msg=name)


def test_sequence_first_layer_norm():
    """batch_first=False: (T, B, d) input, examples on dimension 1."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    ref = copy.deepcopy(net)
    T, B = 6, 4
    x = torch.randn(T, B, 5)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    net, opt = dpkernels.make_private(
        net,
        opt,
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        expected_batch_size=B,
        loss_reduction="sum",
        batch_first=False,
        backend="torch",
    )
    net(x).square().sum().backward()
    opt.write_private_grads()

    def loss_one(params, x_i):  # x_i (T, d): example i
        return torch.func.functional_call(ref, params, (x_i,)).square().sum()

    params = {k: v.detach().double() for k, v in ref.named_parameters()}
    ref.double()
    per = vmap(grad(loss_one), in_dims=(None, 1))(params, x.double())
    expected, _ = flat_clipped_mean(per, 0.5, B)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[name], rtol=2e-4, atol=2e-6, msg=name)


def test_noise_on_norm_parameters():
    """Every norm parameter gets its own noise draw, with the step's standard deviation."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 300), nn.LayerNorm(300), nn.Linear(300, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    net, opt = dpkernels.make_private(
        net, opt, noise_multiplier=2.0, max_grad_norm=1e-6, expected_batch_size=1, seed=11, backend="torch"
    )
    net(torch.randn(1, 4)).sum().backward()
    opt.write_private_grads()
    w, b = net[1].weight.grad, net[1].bias.grad
    std = opt.noise_std
    for t in (w, b):
        assert abs(float(t.std()) / std - 1) < 0.15 and abs(float(t.mean())) < 0.3 * std
    assert not torch.allclose(w, b)


def test_frozen_weight_trainable_bias():
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 1))
    net[1].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net, opt = dpkernels.make_private(
        net, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3, backend="torch"
    )
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert net[1].weight.grad is None and net[1].bias.grad is not None


def test_batchnorm_is_still_refused():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
    with pytest.raises(ValueError, match="BatchNorm mixes the examples"):
        dpkernels.make_private(
            net,
            torch.optim.SGD(net.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
        )


def test_autocast_runs_norms_in_float32():
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net, opt = dpkernels.make_private(
        net, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3, backend="torch"
    )
    dtypes = {}
    for i in (0, 1):
        net[i].register_forward_hook(lambda m, a, out, i=i: dtypes.__setitem__(i, out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(3, 4))
    assert dtypes == {0: torch.bfloat16, 1: torch.float32}
    out.float().sum().backward()
    opt.step()
    assert net[1].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("style", ["flat", "per_layer", "group"])
def test_styles_and_accumulation_with_norm_layers(device, backend, style):
    """Norm layers compose with every clipping style and with gradient accumulation: micro-batches
    give the step of the whole batch, noise included."""
    torch.manual_seed(6)
    base = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8), nn.RMSNorm(8), nn.Linear(8, 2))
    base.to(device)
    x = torch.randn(6, 3, 5).to(device)
    kw = dict(clipping=style, max_grad_norm=0.4, noise_multiplier=0.7, expected_batch_size=6, seed=8, backend=backend)
    if style == "group":
        kw["groups"] = [["0", "1"], ["3", "4", "5"]]

    def run(chunks):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = dpkernels.make_private(model, opt, **kw)
        start = 0
        for i, n in enumerate(chunks):
            model(x[start : start + n]).square().mean().backward()
            start += n
            if i + 1 < len(chunks):
                opt.accumulate()
        opt.step()
        return {n: p.grad for n, p in model.named_parameters()}

    whole, parts = run((6,)), run((2, 4))
    assert whole["1.weight"].abs().sum() > 0 and whole["4.weight"].abs().sum() > 0
    for n in whole:
        torch.testing.assert_close(parts[n], whole[n], rtol=1e-5, atol=1e-6, msg=n)
