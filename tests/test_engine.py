"""make_private end to end: one DP-SGD step equals the oracle's clipped, averaged gradient.

The oracle computes per-example gradients of every parameter with torch.func in float64,
clips them flat across ALL parameters (c_i = min(1, C / (‖g_i‖ + 1e-6))) and divides the sum
by the expected batch size. With noise on, the noise is measured (its standard deviation
must be σC/B̄) and tied to the Philox counter (seed, step, stream = parameter index).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpkernels
from dpkernels.engine import PoissonSampler
from dpkernels.nn import DPLinear
from dpkernels.ops.philox import PhiloxKey, philox_normal
from oracle import batch_loss, flat_clipped_mean, model_per_example_grads

NORM_METHODS = ["auto", "ghost", "direct"]


# ------------------------------------------------------------------ helpers ---------------


def mlp(d_in: int, hidden: int, d_out: int, *, seed: int = 0, bias1: bool = True, device="cpu") -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias1), nn.Tanh(), nn.Linear(hidden, d_out)).to(device)


def data(kind: str, device, seed: int = 1):
    """(model, x, target, loss kind) for a named setup."""
    g = torch.Generator().manual_seed(seed)
    if kind == "2d-ce":
        model = mlp(7, 33, 5, device=device)
        x = torch.randn(5, 7, generator=g) * torch.tensor([0.2, 1.0, 3.0, 0.5, 2.0]).view(5, 1)
        t = torch.randint(0, 5, (5,), generator=g)
        return model, x.to(device), t.to(device), "ce"
    if kind == "seq-sq":  # (B, T, d) through the Linear layers, loss summed over T
        model = mlp(7, 33, 3, device=device)
        x = torch.randn(4, 6, 7, generator=g) * torch.tensor([0.3, 1.0, 2.0, 0.7]).view(4, 1, 1)
        t = torch.randn(4, 6, 3, generator=g)
        return model, x.to(device), t.to(device), "sq"
    if kind == "seq-ce-nobias":  # per-position cross-entropy summed over T; first layer without bias
        model = mlp(9, 17, 4, bias1=False, device=device)
        x = torch.randn(3, 70, 9, generator=g) * torch.tensor([0.5, 1.0, 2.5]).view(3, 1, 1)
        t = torch.randint(0, 4, (3, 70), generator=g)
        return model, x.to(device), t.to(device), "ce"
    raise ValueError(kind)


def pick_clip_norm(norms: torch.Tensor) -> float:
    """A C between the two middle norms: some examples clipped, some not."""
    s = norms.sort().values
    k = len(s) // 2
    C = float(s[k - 1] + s[k]) / 2
    assert bool((norms > C).any()) and bool((norms < C).any())
    return C


def assert_grads_close(model: nn.Module, expected: dict, rtol: float = 1e-4) -> None:
    for name, p in model.named_parameters():
        if name not in expected:
            continue
        assert p.grad is not None, name
        ref = expected[name]
        torch.testing.assert_close(
            p.grad.double().cpu(), ref.cpu(), rtol=rtol, atol=rtol * 1e-2 * float(ref.abs().max()), msg=name
        )


class FakeAccountant:
    def __init__(self) -> None:
        self.calls = []

    def step(self, *, noise_multiplier, sample_rate, steps):
        self.calls.append((noise_multiplier, sample_rate, steps))


def private(model, *, lr=0.1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    kw.setdefault("noise_multiplier", 0.0)
    kw.setdefault("max_grad_norm", 1.0)
    kw.setdefault("expected_batch_size", 8)
    return dpkernels.make_private(model, opt, **kw)


def noise_of(model_noisy, model_clean) -> dict:
    return {
        n: (p.grad.double() - q.grad.double())
        for (n, p), (_, q) in zip(model_noisy.named_parameters(), model_clean.named_parameters())
    }


def one_step(model, opt, x, t, loss_kind, reduction):
    opt.zero_grad()
    batch_loss(loss_kind, model(x), t, reduction).backward()
    opt.step()


# ------------------------------------------------------------------ the step --------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("norm_method", NORM_METHODS)
@pytest.mark.parametrize("kind", ["2d-ce", "seq-sq", "seq-ce-nobias"])
def test_step_equals_oracle_flat_clipping(device, backend, kind, norm_method, reduction):
    model, x, t, loss_kind = data(kind, device)
    per_example = model_per_example_grads(model, x, t, loss_kind)
    _, norms = flat_clipped_mean(per_example, 1.0, 1.0)
    C = pick_clip_norm(norms)
    Bbar = 8  # not the realised batch size: the sum is divided by the expected one
    expected, _ = flat_clipped_mean(per_example, C, Bbar)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = 0.1

    model, opt = private(
        model,
        lr=lr,
        max_grad_norm=C,
        expected_batch_size=Bbar,
        loss_reduction=reduction,
        norm_method=norm_method,
        backend=backend,
    )
    batch_loss(loss_kind, model(x), t, reduction).backward()
    opt.step()
    assert_grads_close(model, expected)
    # the wrapped SGD stepped on exactly these gradients
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - lr * p.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_4d_input_and_sum_loss(device, backend, reduction):
    """(B, T1, T2, d) input, loss = sum of the outputs: the output gradient reaches the kernels as a
    stride-0 (expanded) tensor."""
    model = mlp(7, 9, 4, seed=2, device=device)
    x = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(5)).to(device)
    x = x * torch.tensor([0.2, 1.0, 2.0], device=device).view(3, 1, 1, 1)
    t = torch.zeros(3, device=device)  # unused by the "sum" loss
    per_example = model_per_example_grads(model, x, t, "sum")
    _, norms = flat_clipped_mean(per_example, 1.0, 1.0)
    C = float(norms.sort().values[1:].mean())  # clips the larger norms only
    expected, _ = flat_clipped_mean(per_example, C, 4)
    model, opt = private(model, max_grad_norm=C, expected_batch_size=4, loss_reduction=reduction, backend=backend)
    one_step(model, opt, x, t, "sum", reduction)
    assert_grads_close(model, expected)


class SeqFirstHead(nn.Module):
    """A position-wise MLP on (T, B, d) input plus a classifier on the mean over T, (B, d): the
    sequence-first layout (batch on dimension 1) next to a batch-first (B, d) layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = mlp(7, 11, 6, seed=3)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, B, 7) -> (B, 4)
        return self.head(torch.tanh(self.body(x)).mean(dim=0))


@pytest.mark.parametrize("norm_method", NORM_METHODS)
@pytest.mark.parametrize("contiguous", [True, False])
def test_sequence_first_step_equals_oracle(device, backend, norm_method, contiguous):
    """batch_first=False: (T, B, d) inputs are clipped per example (dimension 1), not per position."""
    model = SeqFirstHead().to(device)
    g = torch.Generator().manual_seed(11)
    x_bf = (torch.randn(5, 9, 7, generator=g) * torch.tensor([0.2, 1.0, 3.0, 0.5, 2.0]).view(5, 1, 1)).to(device)
    t = torch.randint(0, 4, (5,), generator=g).to(device)

    class BatchFirst(nn.Module):  # the same function of (B, T, d), for the oracle
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.transpose(0, 1))

    per_example = {
        k.removeprefix("inner."): v for k, v in model_per_example_grads(BatchFirst(model), x_bf, t, "ce").items()
    }
    _, norms = flat_clipped_mean(per_example, 1.0, 1.0)
    C = pick_clip_norm(norms)
    expected, _ = flat_clipped_mean(per_example, C, 6)

    x_sf = x_bf.transpose(0, 1)  # (T=9, B=5, 7): a strided view
    if contiguous:
        x_sf = x_sf.contiguous()
    model, opt = private(
        model, max_grad_norm=C, expected_batch_size=6, batch_first=False, norm_method=norm_method, backend=backend
    )
    batch_loss("ce", model(x_sf), t, "mean").backward()
    opt.step()
    assert_grads_close(model, expected)


def test_sequence_first_input_without_batch_first_false_is_refused(device):
    """The default batch_first=True on (T, B, d) input would clip positions: refused when T is
    implausible as a batch size, before any gradient is written."""
    model = SeqFirstHead().to(device)
    x = torch.randn(64, 5, 7, device=device)  # T = 64 positions, B = 5 examples
    model, opt = private(model, expected_batch_size=5, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="B = 64 examples.*batch_first=False"):  # the (B, d) head disagrees with T
        batch_loss("ce", model(x), torch.zeros(5, dtype=torch.long, device=device), "mean").backward()
    opt.zero_grad()
    body, opt = private(mlp(7, 11, 6, seed=3).to(device), expected_batch_size=5, noise_multiplier=1.0)
    body(x).square().mean().backward()  # every layer sees T=64 on dimension 0: consistent, but wrong
    with pytest.raises(ValueError, match="batch_first=False"):
        opt.step()
    assert all(p.grad is None for p in body.parameters())
    assert opt.steps_taken == 0


def test_autocast_bfloat16_step(backend, device):
    """Mixed precision: forward under torch.autocast(bfloat16), float32 parameters and gradients.

    (Regression: the saved input was float32 while the output gradient came back bfloat16.)
    """
    model, x, t, loss_kind = data("2d-ce", device)
    per_example = model_per_example_grads(model, x, t, loss_kind)
    _, norms = flat_clipped_mean(per_example, 1.0, 1.0)
    C = pick_clip_norm(norms)
    expected, _ = flat_clipped_mean(per_example, C, 8)
    model, opt = private(model, max_grad_norm=C, expected_batch_size=8, backend=backend)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(x)
    batch_loss(loss_kind, out.float(), t, "mean").backward()
    opt.step()
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        ref = expected[n]
        torch.testing.assert_close(p.grad.double().cpu(), ref.cpu(), rtol=5e-2, atol=5e-2 * float(ref.abs().max()))


def test_clipped_contributions_are_bounded(device, backend):
    """Each example's contribution to the update has norm ≤ C/B̄ (the sensitivity the accountant assumes)."""
    model, x, t, loss_kind = data("2d-ce", device)
    C, Bbar = 0.05, 5  # far below every example's norm: every example is clipped
    for i in range(x.shape[0]):
        m = copy.deepcopy(model)
        m, opt = private(m, max_grad_norm=C, expected_batch_size=Bbar, loss_reduction="sum", backend=backend)
        batch_loss(loss_kind, m(x[i : i + 1]), t[i : i + 1], "sum").backward()
        opt.step()
        norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in m.parameters()))
        assert norm <= C / Bbar * (1 + 1e-5)
        assert norm >= C / Bbar * (1 - 1e-4)  # clipped to exactly C


def test_several_steps_keep_matching_the_oracle(device, backend):
    model, x, t, loss_kind = data("seq-sq", device)
    shadow = copy.deepcopy(model)
    model, opt = private(model, lr=0.05, max_grad_norm=0.5, expected_batch_size=4, backend=backend)
    for _ in range(3):
        per_example = model_per_example_grads(shadow, x, t, loss_kind)
        expected, _ = flat_clipped_mean(per_example, 0.5, 4)
        one_step(model, opt, x, t, loss_kind, "mean")
        assert_grads_close(model, expected)
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), shadow.named_parameters()):
                q.copy_(p)
    assert opt.steps_taken == 3


def test_frozen_layer_is_left_alone(device, backend):
    model, x, t, loss_kind = data("2d-ce", device)
    model[0].requires_grad_(False)
    w0 = model[0].weight.detach().clone()
    per_example = model_per_example_grads(model, x, t, loss_kind)  # trainable parameters only
    assert set(per_example) == {"2.weight", "2.bias"}
    _, norms = flat_clipped_mean(per_example, 1.0, 1.0)
    C = pick_clip_norm(norms)
    expected, _ = flat_clipped_mean(per_example, C, 8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=1.0, max_grad_norm=C, expected_batch_size=8, backend=backend, seed=5
    )
    one_step(model, opt, x, t, loss_kind, "mean")
    assert model[0].weight.grad is None and torch.equal(model[0].weight.detach(), w0)
    # with noise on, the trainable layer's gradient is the oracle plus noise of the right size
    noise = {n: model.get_parameter(n).grad.double().cpu() - expected[n].cpu() for n in expected}
    assert float(noise["2.weight"].std()) == pytest.approx(1.0 * C / 8, rel=0.5)


# ------------------------------------------------------------------ noise -----------------


def _big_layer(device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(300, 200)).to(device)


def test_noise_std_and_mean(device, backend):
    """The update's noise is σC/B̄·z: measured on a 200×300 layer (60,000 draws)."""
    sigma, C, Bbar = 1.3, 0.7, 6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, generator=g).to(device)
    t = torch.randn(3, 200, generator=g).to(device)
    noisy, clean = _big_layer(device), _big_layer(device)
    noisy, opt_n = private(
        noisy, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=Bbar, seed=2024, backend=backend
    )
    clean, opt_c = private(clean, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=Bbar, backend=backend)
    one_step(noisy, opt_n, x, t, "sq", "sum")
    one_step(clean, opt_c, x, t, "sq", "sum")
    noise = noise_of(noisy, clean)
    z = noise["0.weight"].flatten()
    std = sigma * C / Bbar
    assert opt_n.noise_std == pytest.approx(std)
    n = z.numel()
    assert abs(float(z.mean())) < 5 * std / math.sqrt(n)
    assert float(z.std()) == pytest.approx(std, rel=5 / math.sqrt(2 * n))
    assert float(noise["0.bias"].std()) == pytest.approx(std, rel=0.3)
    # and it is the counter scheme: seed, step 0, stream = parameter index (weight 0, bias 1)
    for name, stream in (("0.weight", 0), ("0.bias", 1)):
        p = noisy.get_parameter(name)
        ref = std * philox_normal(p.numel(), PhiloxKey(2024, 0, stream), device).double().view(p.shape)
        torch.testing.assert_close(noise[name], ref, rtol=1e-4, atol=1e-5 * std)


def test_noise_differs_across_elements_layers_and_steps(device, backend):
    torch.manual_seed(3)
    make = lambda: nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 50)).to(device)  # noqa: E731
    noisy, clean = make(), make()
    clean.load_state_dict(noisy.state_dict())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 30, generator=g).to(device)
    t = torch.randn(4, 50, generator=g).to(device)
    # lr = 0: the parameters stay put, so the clean gradient is the same at both steps
    noisy, opt_n = private(
        noisy, lr=0.0, noise_multiplier=2.0, max_grad_norm=1.0, expected_batch_size=4, seed=77, backend=backend
    )
    clean, opt_c = private(clean, lr=0.0, max_grad_norm=1.0, expected_batch_size=4, backend=backend)
    draws = {}
    for step in range(2):
        one_step(noisy, opt_n, x, t, "sq", "sum")
        one_step(clean, opt_c, x, t, "sq", "sum")
        for name, z in noise_of(noisy, clean).items():
            draws[(name, step)] = z.flatten()
    std = 2.0 * 1.0 / 4
    stream = {n: i for i, (n, _) in enumerate(noisy.named_parameters())}
    for (name, step), z in draws.items():
        numel = z.numel()
        ref = std * philox_normal(numel, PhiloxKey(77, step, stream[name]), device).double()
        torch.testing.assert_close(z, ref, rtol=1e-4, atol=1e-5)
        # within one tensor: neighbours uncorrelated, essentially all values distinct
        if numel > 100:
            lag = torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()
            assert abs(lag) < 5 / math.sqrt(numel)
            assert torch.unique(z).numel() >= 0.99 * numel
    keys = list(draws)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            a, b = draws[keys[i]], draws[keys[j]]
            m = min(a.numel(), b.numel())
            assert not bool((a[:m] == b[:m]).any()), (keys[i], keys[j])
            if m >= 40:
                corr = torch.corrcoef(torch.stack([a[:m], b[:m]]))[0, 1].item()
                assert abs(corr) < 5 / math.sqrt(m), (keys[i], keys[j])


def _run_seeded(device, backend, seed):
    model, x, t, loss_kind = data("2d-ce", device)
    model, opt = private(
        model, noise_multiplier=1.0, max_grad_norm=0.5, expected_batch_size=5, seed=seed, backend=backend
    )
    grads = []
    for _ in range(2):
        one_step(model, opt, x, t, loss_kind, "mean")
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


def test_same_seed_same_grads_other_seed_other_grads(device, backend):
    a = _run_seeded(device, backend, 123)
    b = _run_seeded(device, backend, 123)
    c = _run_seeded(device, backend, 124)
    d = _run_seeded(device, backend, None)
    e = _run_seeded(device, backend, None)
    for step in range(2):
        for ga, gb, gc, gd, ge in zip(a[step], b[step], c[step], d[step], e[step]):
            assert torch.equal(ga, gb)
            assert bool((ga != gc).all())
            assert bool((gd != ge).all())  # no seed: fresh from the OS, never repeated


def test_noise_only_step(device, backend):
    model, _, _, _ = data("2d-ce", device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    acc = FakeAccountant()
    model, opt = private(
        model,
        lr=0.5,
        noise_multiplier=1.5,
        max_grad_norm=2.0,
        expected_batch_size=10,
        seed=99,
        backend=backend,
        accountant=acc,
        sample_rate=0.01,
    )
    for step in range(2):
        opt.noise_only_step()
        for i, (_, p) in enumerate(model.named_parameters()):
            ref = 1.5 * 2.0 / 10 * philox_normal(p.numel(), PhiloxKey(99, step, i), device).view(p.shape)
            torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6)
    assert opt.steps_taken == 2 and len(acc.calls) == 2
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_noise_only_step_without_noise_leaves_params(device, backend):
    model, _, _, _ = data("2d-ce", device)
    before = copy.deepcopy(model.state_dict())
    model, opt = private(model, backend=backend)
    opt.noise_only_step()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))
        assert torch.equal(p.detach(), before[n])


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(7, 11)
        self.unused = nn.Linear(5, 3)
        self.fc2 = nn.Linear(11, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_unused_layer_gets_noise_only(device, backend, sigma):
    torch.manual_seed(0)
    model = WithUnused().to(device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 7, generator=g).to(device)
    t = torch.randint(0, 4, (4,), generator=g).to(device)
    per_example = model_per_example_grads(model, x, t, "ce")
    for n in ("unused.weight", "unused.bias"):
        assert not bool(per_example[n].any())
    expected, _ = flat_clipped_mean(per_example, 0.3, 4)
    model, opt = private(
        model, noise_multiplier=sigma, max_grad_norm=0.3, expected_batch_size=4, seed=8, backend=backend
    )
    one_step(model, opt, x, t, "ce", "mean")
    streams = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    std = sigma * 0.3 / 4
    for n in ("unused.weight", "unused.bias"):
        p = model.get_parameter(n)
        assert p.grad is not None
        ref = std * philox_normal(p.numel(), PhiloxKey(8, 0, streams[n]), device).view(p.shape)
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)
    if sigma == 0.0:
        assert_grads_close(model, expected)


# ------------------------------------------------------------------ integration -----------


def test_parameters_shared_by_identity_and_layout_unchanged():
    model = mlp(7, 33, 5)
    keys = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pmodel, dp_opt = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    assert pmodel is model  # converted in place
    assert isinstance(model[0], DPLinear) and isinstance(model[0], nn.Linear)
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(a is b for a, b in zip(dp_opt.param_groups[0]["params"], model.parameters()))
    assert dp_opt.param_groups is opt.param_groups
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == keys
    # an nn.Linear model loads the private model's state_dict and computes the same function
    plain = mlp(7, 33, 5, seed=1)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 7)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


def test_root_linear_model():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    w = lin.weight
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    model, dp_opt = dpkernels.make_private(
        lin, opt, noise_multiplier=0.0, max_grad_norm=1e6, expected_batch_size=3, loss_reduction="sum"
    )
    assert isinstance(model, DPLinear) and model.weight is w
    x = torch.randn(3, 6)
    model(x).sum().backward()
    dp_opt.step()
    # nothing clipped (huge C): the gradient is the ordinary one divided by B̄
    torch.testing.assert_close(w.grad, torch.ones(4, 3) @ x / 3)


def test_dplinear_outside_an_engine_is_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(13, 7)
    dp = DPLinear(13, 7)
    dp.load_state_dict(ref.state_dict())
    for shape in [(5, 13), (2, 3, 13), (13,)]:
        x1 = torch.randn(*shape, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_(True)
        y1, y2 = ref(x1), dp(x2)
        assert torch.equal(y1, y2)
        w = torch.randn_like(y1)
        (y1 * w).sum().backward()
        (y2 * w).sum().backward()
        assert torch.equal(x1.grad, x2.grad)
        assert torch.equal(ref.weight.grad, dp.weight.grad) and torch.equal(ref.bias.grad, dp.bias.grad)
    shared = DPLinear.from_linear(ref)
    assert shared.weight is ref.weight and shared.bias is ref.bias
    assert list(shared.state_dict()) == list(ref.state_dict())
    nob = DPLinear.from_linear(nn.Linear(3, 2, bias=False))
    assert nob.bias is None and list(nob.state_dict()) == ["weight"]


def test_no_grad_forward_after_make_private():
    model = mlp(7, 33, 5)
    plain = copy.deepcopy(model)
    model, opt = private(model)
    x = torch.randn(4, 7)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert not opt.collector.records  # nothing recorded without a backward


def test_accountant_called_once_per_step(device, backend):
    model, x, t, loss_kind = data("2d-ce", device)
    acc = FakeAccountant()
    model, opt = private(model, noise_multiplier=0.9, backend=backend, accountant=acc, sample_rate=0.05)
    for k in range(3):
        one_step(model, opt, x, t, loss_kind, "mean")
        assert len(acc.calls) == k + 1
    opt.noise_only_step()
    assert acc.calls == [(0.9, 0.05, 1)] * 4


def test_lr_scheduler_drives_the_wrapped_optimizer(device, backend):
    model, x, t, loss_kind = data("2d-ce", device)
    model, opt = private(model, lr=0.4, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for lr in (0.4, 0.2):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        one_step(model, opt, x, t, loss_kind, "mean")
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[n] - lr * p.grad, rtol=0, atol=1e-6)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_zero_grad_discards_a_recorded_backward(device, backend):
    model, x, t, loss_kind = data("2d-ce", device)
    model, opt = private(model, backend=backend)
    batch_loss(loss_kind, model(x), t, "mean").backward()
    assert opt.collector.records
    opt.zero_grad()
    assert not opt.collector.records
    one_step(model, opt, x, t, loss_kind, "mean")  # a fresh backward works


def test_optimizer_state_dict_has_no_seed():
    model, x, t, loss_kind = data("2d-ce", "cpu")
    seed = 0x1234567890ABCDEF
    model, opt = private(model, noise_multiplier=1.0, seed=seed)
    one_step(model, opt, x, t, loss_kind, "mean")
    sd = opt.state_dict()
    assert sd["steps_taken"] == 1
    assert str(seed) not in repr(sd) and hex(seed)[2:] not in repr(sd).lower()


# ------------------------------------------------------------------ Poisson sampling ------


def test_poisson_sampler_batch_sizes():
    N, q, steps = 1000, 0.05, 400
    sampler = PoissonSampler(N, q, steps, generator=torch.Generator().manual_seed(0))
    assert len(sampler) == steps and sampler.expected_batch_size == 50
    batches = list(sampler)
    assert len(batches) == steps
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    sd = math.sqrt(N * q * (1 - q))
    assert abs(float(sizes.mean()) - N * q) < 5 * sd / math.sqrt(steps)
    assert float(sizes.std()) == pytest.approx(sd, rel=0.25)
    counts = torch.zeros(N)
    for b in batches:
        assert b.dtype == torch.int64
        assert torch.unique(b).numel() == b.numel()
        assert int(b.min()) >= 0 and int(b.max()) < N
        counts[b] += 1
    # each example joins independently with probability q
    assert abs(float(counts.mean()) - q * steps) < 0.5
    assert float(counts.std()) == pytest.approx(math.sqrt(steps * q * (1 - q)), rel=0.2)


def test_poisson_sampler_empty_batches_at_tiny_rates():
    sampler = PoissonSampler(100, 1e-4, 50, generator=torch.Generator().manual_seed(1))
    sizes = [len(b) for b in sampler]
    assert sizes.count(0) >= 40
    assert sampler.expected_batch_size == 1


def test_poisson_sampler_reproducible_with_generator():
    a = list(PoissonSampler(500, 0.1, 20, generator=torch.Generator().manual_seed(5)))
    b = list(PoissonSampler(500, 0.1, 20, generator=torch.Generator().manual_seed(5)))
    c = list(PoissonSampler(500, 0.1, 20, generator=torch.Generator().manual_seed(6)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    lists = list(PoissonSampler(500, 0.1, 20, generator=torch.Generator().manual_seed(5), as_lists=True))
    assert lists == [x.tolist() for x in a]
    # without a generator: a fresh secret one each time
    u = next(iter(PoissonSampler(1000, 0.5, 1)))
    v = next(iter(PoissonSampler(1000, 0.5, 1)))
    assert not torch.equal(u, v)


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 0.1, 1), "num_samples"),
        ((10, 0.0, 1), "sample_rate"),
        ((10, 1.5, 1), "sample_rate"),
        ((10, 0.1, -1), "steps"),
    ],
)
def test_poisson_sampler_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        PoissonSampler(*args)


def test_training_loop_with_poisson_batches(backend, device):
    """A few steps of the documented loop: Poisson batches (some empty), noise_only_step on empty ones."""
    torch.manual_seed(0)
    N = 40
    X = torch.randn(N, 7, device=device)
    Y = torch.randint(0, 5, (N,), device=device)
    model = mlp(7, 9, 5, device=device)
    acc = FakeAccountant()
    sampler = PoissonSampler(N, 0.05, 12, generator=torch.Generator().manual_seed(3))
    model, opt = private(
        model,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=sampler.expected_batch_size,
        seed=1,
        backend=backend,
        accountant=acc,
        sample_rate=0.05,
    )
    empties = 0
    for idx in sampler:
        idx = idx.to(device)
        opt.zero_grad()
        if idx.numel() == 0:
            empties += 1
            opt.noise_only_step()
            continue
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
    assert empties > 0 and opt.steps_taken == 12 and len(acc.calls) == 12
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ------------------------------------------------------------------ wrappers around the model ----


def _two_steps(model: nn.Module, wrap, x: torch.Tensor) -> list:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, dp_opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.7, max_grad_norm=0.5, expected_batch_size=5, seed=123, backend="torch"
    )
    f = wrap(model)
    for _ in range(2):
        dp_opt.zero_grad()
        f(x).square().sum().backward()
        dp_opt.step()
    assert dp_opt.steps_taken == 2
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("wrap", ["torch.compile", "checkpoint"])
def test_compiled_or_checkpointed_model_takes_the_same_private_step(wrap):
    """torch.compile (graph-breaks at the DP layers' autograd functions) and non-reentrant activation
    checkpointing (re-runs the forward inside backward) must record each layer exactly once."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3))
    x = torch.randn(5, 7)
    eager = _two_steps(copy.deepcopy(base), lambda m: m, x)
    if wrap == "torch.compile":
        torch._dynamo.reset()
        wrapped = _two_steps(copy.deepcopy(base), lambda m: torch.compile(m, backend="aot_eager"), x)
    else:
        wrapped = _two_steps(copy.deepcopy(base), lambda m: lambda inp: checkpoint(m, inp, use_reentrant=False), x)
    for a, b in zip(eager, wrapped):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ gradient accumulation ----


def _accumulation_setup(device):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5)).to(device)
    g = torch.Generator().manual_seed(9)
    scale = torch.tensor([0.2, 1.0, 3.0, 0.5, 2.0, 0.1, 1.5]).view(7, 1, 1)
    x = (torch.randn(7, 6, 7, generator=g) * scale).to(device)
    t = torch.randn(7, 6, 5, generator=g).to(device)
    return model, x, t


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("split", [(3, 4), (1, 5, 1), (7,)])
def test_gradient_accumulation_equals_one_logical_batch(device, backend, reduction, split):
    """accumulate() after every micro-batch but the last, then step(): the same gradient as one
    step on the whole batch, noise included (the same Philox counters are drawn once)."""
    base, x, t = _accumulation_setup(device)
    per_example = model_per_example_grads(base, x, t, "sq")
    _, norms = flat_clipped_mean(per_example, 1.0, 1.0)
    C = pick_clip_norm(norms)

    def run(chunks, sigma):
        model = copy.deepcopy(base)
        acc = FakeAccountant()
        model, opt = private(
            model,
            noise_multiplier=sigma,
            max_grad_norm=C,
            expected_batch_size=6,
            seed=31,
            loss_reduction=reduction,
            backend=backend,
            accountant=acc,
            sample_rate=0.5,
        )
        for _ in range(2):  # two logical steps: the second starts from a clean running sum
            opt.zero_grad()
            start = 0
            for i, n in enumerate(chunks):
                batch_loss("sq", model(x[start : start + n]), t[start : start + n], reduction).backward()
                start += n
                if i + 1 < len(chunks):
                    opt.accumulate()
            opt.step()
            grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        assert len(acc.calls) == 2 and opt.steps_taken == 2  # accounted once per logical step
        return model, grads

    whole, g_whole = run((7,), 1.3)
    split_model, g_split = run(split, 1.3)
    for name in g_whole:
        torch.testing.assert_close(g_split[name], g_whole[name], rtol=1e-5, atol=1e-6, msg=name)
    # and without noise, against the oracle directly (first logical step = same initial weights)
    model, opt = private(
        copy.deepcopy(base), max_grad_norm=C, expected_batch_size=6, loss_reduction=reduction, backend=backend
    )
    start = 0
    for i, n in enumerate(split):
        batch_loss("sq", model(x[start : start + n]), t[start : start + n], reduction).backward()
        start += n
        (opt.accumulate if i + 1 < len(split) else opt.step)()
    expected, _ = flat_clipped_mean(per_example, C, 6)
    assert_grads_close(model, expected)


def test_accumulation_misuse_is_refused():
    base, x, t = _accumulation_setup("cpu")
    model, opt = private(copy.deepcopy(base), noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(RuntimeError, match="accumulate\\(\\) called without a backward pass"):
        opt.accumulate()
    model(x[:3].requires_grad_()).sum().backward()
    opt.accumulate()
    # the running sums hold no autograd graph (which would keep the recorded inputs alive)
    assert all(v.grad_fn is None and not v.requires_grad for v in opt._accumulated.values())
    with pytest.raises(RuntimeError, match="noise_only_step\\(\\) called after a backward pass or accumulate"):
        opt.noise_only_step()
    opt.zero_grad()  # discards the running sum: nothing left to step on
    with pytest.raises(RuntimeError, match="without a backward pass"):
        opt.step()
    # the examples of all micro-batches count against expected_batch_size (4 -> at most 28)
    big = torch.randn(20, 7)
    model(big).sum().backward()
    opt.accumulate()
    model(big).sum().backward()
    with pytest.raises(ValueError, match="saw 40 examples"):
        opt.accumulate()
    assert opt._accumulated == {} and opt._accumulated_examples == 0  # the failure discarded everything
    assert all(p.grad is None for p in model.parameters())


def test_layer_used_only_in_an_earlier_micro_batch(backend, device):
    """A layer absent from the last micro-batch still gets its accumulated sum plus its noise."""

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(6)
            self.a = nn.Linear(7, 3)
            self.b = nn.Linear(7, 3)

        def forward(self, x, use_b):
            return self.b(x) if use_b else self.a(x)

    # the same examples through a model that runs both layers on their examples in one step
    class Both(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, mask):
            # examples 0-1 only reach b, 2-4 only reach a: zero rows of G for the others (the mask is
            # an argument: a per-example mask held by the model would not follow the batch)
            return mask * self.inner.b(x) + (1 - mask) * self.inner.a(x)

    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(2)).to(device)
    m1 = Branch().to(device)
    m2 = Both(copy.deepcopy(m1))
    m1, o1 = private(m1, noise_multiplier=0.9, max_grad_norm=0.4, expected_batch_size=5, seed=3, backend=backend)
    m2, o2 = private(m2, noise_multiplier=0.9, max_grad_norm=0.4, expected_batch_size=5, seed=3, backend=backend)
    m1(x[:2], True).square().sum().backward()
    o1.accumulate()
    m1(x[2:], False).square().sum().backward()
    o1.step()
    mask = torch.zeros(5, 1, device=device)
    mask[:2] = 1
    m2(x, mask).square().sum().backward()
    o2.step()
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


# ------------------------------------------------------------------ clipping styles ---------


def _three_layers(device):
    torch.manual_seed(8)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 11), nn.Tanh(), nn.Linear(11, 5)).to(device)


def grouped_clipped_mean(
    per_example: dict, groups: list, thresholds: list, denom: float, automatic_gamma: float = None
) -> dict:
    """Oracle for every style: per group k (a list of layer names), c_i = min(1, C_k/(‖g_i^(k)‖+1e-6))
    or, automatic, C_k/(‖g_i^(k)‖+γ); each group's parameters get Σ_i c_i g_i / denom."""
    out = {}
    for members, C in zip(groups, thresholds):
        names = [n for n in per_example if n.rsplit(".", 1)[0] in members]
        B = per_example[names[0]].shape[0]
        norms = sum(per_example[n].reshape(B, -1).square().sum(1) for n in names).sqrt()
        if automatic_gamma is None:
            c = (C / (norms + 1e-6)).clamp(max=1.0)
        else:
            c = C / (norms + automatic_gamma)
        for n in names:
            out[n] = torch.einsum("i,i...->...", c, per_example[n]) / denom
    return out


STYLE_CASES = {
    # style: (groups for the oracle, make_private kwargs builder)
    "per_layer": [["0"], ["2"], ["4"]],
    "group": [["0", "4"], ["2"]],
    "automatic": [["0", "2", "4"]],
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("thresholds", ["one", "list"])
@pytest.mark.parametrize("style", list(STYLE_CASES))
def test_clipping_styles_equal_oracle(device, backend, style, thresholds, reduction):
    base = _three_layers(device)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 5, 7, generator=g) * torch.linspace(0.1, 3.0, 6).view(6, 1, 1)).to(device)
    t = torch.randn(6, 5, 5, generator=g).to(device)
    per_example = model_per_example_grads(base, x, t, "sq")
    groups = STYLE_CASES[style]
    if style == "automatic" and thresholds == "list":
        pytest.skip("automatic clipping is flat: one threshold")
    C_total = 0.8
    if thresholds == "one":
        per_group = [C_total / math.sqrt(len(groups))] * len(groups)
        arg = C_total
    else:
        per_group = [0.3 * (k + 1) for k in range(len(groups))]
        arg = per_group
    expected = grouped_clipped_mean(
        per_example, groups, per_group, 6, automatic_gamma=0.05 if style == "automatic" else None
    )
    kw = dict(clipping=style, max_grad_norm=arg, expected_batch_size=6, loss_reduction=reduction, backend=backend)
    if style == "group":
        kw["groups"] = groups
    if style == "automatic":
        kw["auto_clip_gamma"] = 0.05
    model, opt = private(copy.deepcopy(base), **kw)
    assert opt.max_grad_norm == pytest.approx(math.sqrt(sum(c * c for c in per_group)))
    batch_loss("sq", model(x), t, reduction).backward()
    if style == "per_layer":  # clipped inside backward: nothing of (x, G) is kept until the step
        assert all(r.payload is None for r in opt.collector.records.values())
        assert len(opt._accumulated) == 6
    opt.step()
    assert_grads_close(model, expected)
    # some examples were clipped and some not in at least one group (the test means something)
    if style != "automatic":
        B = 6
        norms = [
            sum(per_example[f"{m}.{w}"].reshape(B, -1).square().sum(1) for m in grp for w in ("weight", "bias")).sqrt()
            for grp in groups
        ]
        assert any(bool((n > C).any()) for n, C in zip(norms, per_group))


def test_clipping_style_noise_is_scaled_to_total_sensitivity(device, backend):
    """Noise σ·sqrt(Σ C_k²)/B̄, the same Philox draws as flat clipping with that C."""
    base = _three_layers(device)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(1)).to(device)
    thresholds = [0.3, 0.4, 1.2]  # total 1.3
    runs = {}
    for style, mgn in (("per_layer", thresholds), ("flat", 1.3)):
        for sigma in (0.0, 2.0):
            model, opt = private(
                copy.deepcopy(base),
                clipping=style,
                max_grad_norm=mgn,
                noise_multiplier=sigma,
                expected_batch_size=4,
                seed=77,
                backend=backend,
            )
            model(x).square().sum().backward()
            opt.step()
            runs[style, sigma] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    assert opt.noise_std == pytest.approx(2.0 * 1.3 / 4)
    for n in runs["flat", 0.0]:
        noise_layer = runs["per_layer", 2.0][n] - runs["per_layer", 0.0][n]
        noise_flat = runs["flat", 2.0][n] - runs["flat", 0.0][n]
        torch.testing.assert_close(noise_layer, noise_flat, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("split", [(2, 3), (1, 1, 3)])
def test_per_layer_clipping_with_accumulation(device, backend, split):
    base = _three_layers(device)
    x = torch.randn(5, 4, 7, generator=torch.Generator().manual_seed(12)).to(device)

    def run(chunks):
        model, opt = private(
            copy.deepcopy(base),
            clipping="per_layer",
            max_grad_norm=0.5,
            noise_multiplier=1.1,
            expected_batch_size=5,
            seed=9,
            backend=backend,
        )
        start = 0
        for i, n in enumerate(chunks):
            model(x[start : start + n]).square().mean().backward()
            start += n
            if i + 1 < len(chunks):
                opt.accumulate()
        opt.step()
        return {n: p.grad for n, p in model.named_parameters()}

    whole, parts = run((5,)), run(split)
    for n in whole:
        torch.testing.assert_close(parts[n], whole[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(clipping="layerwise"), "clipping must be one of"),
        (dict(clipping="group"), "needs groups="),
        (dict(clipping="group", groups=[["0"]]), "in no clipping group"),
        (dict(clipping="group", groups=[["0", "2"], ["2"]]), "is in clipping groups 0 and 1"),
        (dict(clipping="group", groups=[["0", "2"], ["x"]]), "names 'x', which is not a DP layer"),
        (dict(clipping="group", groups=[["0", "2"], []]), "group 1 is empty"),
        (dict(clipping="per_layer", max_grad_norm=[1.0]), "1 thresholds for 2 clipping groups"),
        (dict(clipping="flat", max_grad_norm=[1.0, 1.0]), "takes one max_grad_norm"),
        (dict(clipping="per_layer", max_grad_norm=[1.0, -1.0]), "max_grad_norm must be a finite number > 0"),
        (dict(clipping="flat", groups=[["0"], ["2"]]), "groups= is for clipping='group'"),
        (dict(clipping="automatic", auto_clip_gamma=0.0), "auto_clip_gamma must be"),
    ],
)
def test_clipping_style_errors(kwargs, match):
    model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 4))
    kw = dict(max_grad_norm=1.0)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        private(model, **kw)


@pytest.mark.parametrize("style", ["group", "automatic", "per_layer"])
def test_styles_with_accumulation_and_sequence_first(device, backend, style):
    """The style composes with gradient accumulation and batch_first=False: micro-batches of a
    (T, B, d) batch give the step of the whole batch, noise included."""
    base = _three_layers(device)
    x = torch.randn(4, 6, 7, generator=torch.Generator().manual_seed(21)).to(device)  # (T=4, B=6, d)
    kw = dict(
        clipping=style,
        max_grad_norm=0.6,
        noise_multiplier=0.8,
        expected_batch_size=6,
        seed=5,
        batch_first=False,
        backend=backend,
    )
    if style == "group":
        kw["groups"] = [["2"], ["0", "4"]]

    def run(chunks):
        model, opt = private(copy.deepcopy(base), **kw)
        start = 0
        for i, n in enumerate(chunks):
            model(x[:, start : start + n]).square().sum(dim=(0, 2)).mean().backward()
            start += n
            if i + 1 < len(chunks):
                opt.accumulate()
        opt.step()
        return {n: p.grad for n, p in model.named_parameters()}

    whole, parts = run((6,)), run((4, 2))
    for n in whole:
        torch.testing.assert_close(parts[n], whole[n], rtol=1e-5, atol=1e-6, msg=n)
