"""dpkernels.integrations.opacus: Opacus' ghost clipping with dpkernels' fused norms.

The fused sampler must give Opacus exactly the per-sample norms its own nn.Linear sampler gives
(which materialises B×T×T Grams), and a whole Opacus ghost-clipping step must come out the same.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

opacus = pytest.importorskip("opacus")

from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample  # noqa: E402
from opacus.grad_sample.linear import compute_linear_norm_sample  # noqa: E402

import dpkernels.integrations.opacus as dpk_opacus  # noqa: E402
from oracle import make_linear_inputs  # noqa: E402

CASES = ["2d:1x7x5", "2d:6x33x17", "3d:3x1x9x4", "3d:4x70x9x13", "4d_permuted:2x3x5x7x45"]


@pytest.fixture(autouse=True)
def _restore_opacus():
    yield
    dpk_opacus.restore_opacus_norms()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_norms_equal_opacus_own(device, backend, case, bias):
    x, g = make_linear_inputs(case, device)
    if x.dim() > 3:  # Opacus' own 3-D path takes (B, T, d); flatten the middle dims for it
        x_ref, g_ref = x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
    else:
        x_ref, g_ref = x, g
    layer = nn.Linear(x.shape[-1], g.shape[-1], bias=bias).to(device)
    ours = dpk_opacus.linear_norm_sample(layer, [x], g, backend=backend)
    theirs = compute_linear_norm_sample(layer, [x_ref.double()], g_ref.double())
    assert set(ours) == set(theirs)
    for p in theirs:
        assert ours[p].dtype == g.dtype and ours[p].shape == (x.shape[0],)
        torch.testing.assert_close(ours[p].double(), theirs[p], rtol=1e-5, atol=1e-7)


def test_bfloat16_norms(device, backend):
    x, g = make_linear_inputs("3d:3x20x24x40", device, dtype=torch.bfloat16)
    layer = nn.Linear(24, 40).to(device)
    ours = dpk_opacus.linear_norm_sample(layer, [x], g, backend=backend)
    theirs = compute_linear_norm_sample(layer, [x.double()], g.double())
    for p in theirs:
        assert ours[p].dtype == torch.bfloat16
        torch.testing.assert_close(ours[p].double(), theirs[p], rtol=2e-2, atol=1e-3)


def _ghost_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gs_model, dp_opt, criterion, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            criterion=nn.CrossEntropyLoss(),
            noise_multiplier=0.0,
            max_grad_norm=0.3,
            poisson_sampling=False,
            grad_sample_mode="ghost",
        )
        logits = gs_model(x)
        loss = criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), shape=logits.shape)
        loss.backward()
        dp_opt.step()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_opacus_ghost_step_is_unchanged_and_uses_the_fused_kernels(monkeypatch, backend, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 16), nn.Tanh(), nn.Linear(16, 5)).to(device)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 11, 9, generator=g) * torch.linspace(0.2, 3.0, 6).view(6, 1, 1)).to(device)
    y = torch.randint(0, 5, (6, 11), generator=g).to(device)
    reference = _ghost_step(copy.deepcopy(model), x, y)

    calls = []
    fused = dpk_opacus.functional.linear_sq_norms

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return fused(*args, **kwargs)

    monkeypatch.setattr(dpk_opacus.functional, "linear_sq_norms", counting)
    dpk_opacus.use_fused_norms(backend=backend)
    ours = _ghost_step(copy.deepcopy(model), x, y)
    assert calls == [backend, backend]  # one fused norm per Linear
    for n in reference:
        torch.testing.assert_close(ours[n], reference[n], rtol=1e-5, atol=1e-7, msg=n)


def test_restore_gives_back_opacus_sampler():
    registry = dpk_opacus._registry()
    original = {t: registry[t] for t in (nn.Linear, nn.Embedding)}
    dpk_opacus.use_fused_norms()
    dpk_opacus.use_fused_norms(method="ghost")  # a second call keeps the original to restore
    assert all(registry[t] is not original[t] for t in original)
    dpk_opacus.restore_opacus_norms()
    assert all(registry[t] is original[t] for t in original)
    dpk_opacus.restore_opacus_norms()  # idempotent
    assert all(registry[t] is original[t] for t in original)


@pytest.mark.parametrize("shape,vocab", [((5, 9), 4), ((1, 17), 30), ((6,), 3), ((3, 4, 5), 7)])
def test_embedding_norms_equal_opacus_own(device, backend, shape, vocab):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, shape, generator=g).to(device)  # small vocabularies: tokens repeat
    grads = torch.randn(*shape, 6, generator=g).to(device)
    layer = nn.Embedding(vocab, 6).to(device)
    ours = dpk_opacus.embedding_norm_sample(layer, [ids], grads, backend=backend)
    ids2, grads2 = (ids.unsqueeze(1), grads.unsqueeze(1)) if ids.dim() == 1 else (ids, grads)
    theirs = compute_embedding_norm_sample(
        layer, [ids2.reshape(shape[0], -1)], grads2.reshape(shape[0], -1, 6).double()
    )
    torch.testing.assert_close(ours[layer.weight].double(), theirs[layer.weight].double(), rtol=1e-5, atol=1e-7)


def test_opacus_ghost_step_with_an_embedding_uses_the_fused_kernel(monkeypatch, backend, device):
    torch.manual_seed(0)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    model = Bag().to(device)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 7, (5, 6), generator=g).to(device)
    y = torch.randint(0, 3, (5, 6), generator=g).to(device)
    reference = _ghost_step(copy.deepcopy(model), ids, y)
    calls = []
    fused = dpk_opacus.functional.embedding_sq_norms
    monkeypatch.setattr(
        dpk_opacus.functional, "embedding_sq_norms", lambda *a, **k: calls.append(k.get("backend")) or fused(*a, **k)
    )
    dpk_opacus.use_fused_norms(backend=backend)
    ours = _ghost_step(copy.deepcopy(model), ids, y)
    assert calls == [backend]
    for n in reference:
        torch.testing.assert_close(ours[n], reference[n], rtol=1e-5, atol=1e-7, msg=n)
