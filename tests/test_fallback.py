"""The torch.func fallback for modules with small parameters of their own and no DP layer.

Bare parameters used by concatenation (a class token), addition (position embeddings) and
elementwise scaling (layer scale), at the root or in a submodule: exact against a float64
per-example loop in every clipping style; reported, or refused with ``fallback=False``; and
refused where the per-example gradients cannot be recomputed (randomness in training, examples
mixed, a parameter used outside the module, too many parameters, BatchNorm).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpkernels
from dpkernels.nn import fallback as fallback_module
from dpkernels.nn.fallback import DPFallbackWarning


class Tokens(nn.Module):
    """A class token, added position embeddings and a scale, all bare parameters of the root."""

    def __init__(self, d=5, T=3):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, T + 1, d))
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)
        self.lin = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.lin(torch.tanh(h * self.gamma)).mean(1)


class Scale(nn.Module):
    def __init__(self, d, p_drop=0.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)
        self.drop = nn.Dropout(p_drop)

    def forward(self, x):
        return self.drop(x * self.gamma)


class Blocks(nn.Module):
    """Layer-scale submodules between linear layers."""

    def __init__(self, d=5, p_drop=0.0):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.s1 = Scale(d, p_drop)
        self.b = nn.Linear(d, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.s1(self.a(x)))).mean(1)


def _batch(B=6, T=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, d, generator=g), torch.randint(0, 3, (B,), generator=g)


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _private(model, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(dict(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=6, backend="torch"), **kw)
    return dpkernels.make_private(model, opt, **kw)


@pytest.mark.parametrize("clipping", ["flat", "automatic", "per_layer"])
@pytest.mark.parametrize("model", [Tokens, Blocks])
def test_bare_parameters_are_exact(model, clipping):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DPFallbackWarning)
        report = dpkernels.verify(model(), _ce, _batch(), clipping=clipping, backend="torch")
    assert report.ok, str(report)
    assert report.clipped_fraction >= 0.5


def test_the_fallback_is_reported_and_can_be_refused():
    torch.manual_seed(0)
    with pytest.warns(DPFallbackWarning, match=r"s1: no DP layer is registered for .*Scale; its 5 own parameter"):
        _, opt = _private(Blocks())
    assert [name for name, _ in opt.fallback_modules] == ["s1"]
    with pytest.raises(ValueError, match=r"Scale 's1' \(gamma\): no per-example clipping path.*fallback=True\) would"):
        _private(Blocks(), fallback=False)


def test_randomness_inside_the_module_is_refused_at_backward():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DPFallbackWarning)
        model, opt = _private(Blocks(p_drop=0.5))
    x, y = _batch()
    with pytest.raises(RuntimeError, match=r"fallback module 's1' \(.*Scale\).*do not add up.*dropout"):
        _ce(model, (x, y)).backward()


class MixesExamples(nn.Module):
    def __init__(self, d=5):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)
        self.lin = nn.Linear(d, 3)

    def forward(self, x):
        return self.lin(x * self.gamma - (x * self.gamma).mean(0, keepdim=True)).mean(1)


def test_a_module_mixing_examples_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DPFallbackWarning)
        model, _ = _private(MixesExamples())
    with pytest.raises(ValueError, match="do not follow the examples"):
        model(_batch()[0])


class UsedOutside(nn.Module):
    def __init__(self, d=5):
        super().__init__()
        self.s = Scale(d)
        self.lin = nn.Linear(d, 3)

    def forward(self, x):
        return self.lin(self.s(x) + self.s.gamma).mean(1)  # gamma also used outside its module


def test_a_parameter_used_outside_its_module_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DPFallbackWarning)
        model, _ = _private(UsedOutside())
    with pytest.raises(RuntimeError, match="received a gradient outside its DP layer"):
        _ce(model, _batch()).backward()


def test_too_many_parameters_and_batchnorm_stay_refused(monkeypatch):
    monkeypatch.setattr(fallback_module, "FALLBACK_MAX_PARAMETERS", 4)
    with pytest.raises(ValueError, match=r"its 5 own parameter elements are too many for the torch.func fallback"):
        _private(Blocks())
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="BatchNorm mixes the examples"):
        _private(bn)


def test_fallback_noise_is_drawn_once_per_parameter_and_accumulation_matches():
    torch.manual_seed(0)
    base = Tokens()
    x, y = _batch()

    def run(sigma, split):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DPFallbackWarning)
            model, opt = _private(copy.deepcopy(base), noise_multiplier=sigma, seed=5)
        parts = [(x[:2], y[:2]), (x[2:], y[2:])] if split else [(x, y)]
        for i, b in enumerate(parts):
            _ce(model, b).backward()
            if i + 1 < len(parts):
                opt.accumulate()
        opt.write_private_grads()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, opt

    clean, _ = run(0.0, False)
    noisy, opt = run(1.0, False)
    split, _ = run(1.0, True)
    for n in clean:
        torch.testing.assert_close(split[n], noisy[n], rtol=1e-5, atol=1e-6, msg=n)
    expected = dpkernels.functional.gaussian_noise(
        (1, 4, 5), std=opt.noise_std, generator=opt._key(opt.dp_modules[0][1].pos, "pos"), backend="torch"
    )
    torch.testing.assert_close(noisy["pos"] - clean["pos"], expected, rtol=1e-4, atol=1e-6)
