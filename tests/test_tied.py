"""Tied parameters: the cross terms against per-example gradients, and the private step of tied models.

The cross term ⟨g_i^(u), g_i^(v)⟩ of two uses of one parameter is checked against the per-example
gradients formed the slow way (float64), on odd shapes: T = 1, S = 1, repeated tokens,
padding_idx, a vocabulary that is not a multiple of 16, non-contiguous inputs, float32 and
bfloat16, both backends (Triton under TRITON_INTERPRET=1 on CPU). Then whole steps: exact
against a float64 per-example loop in every clipping style, gradient accumulation, and the noise
drawn once per tied parameter.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpkernels
from dpkernels import functional
from dpkernels.engine import ties
import oracle
from helpers import philox_noise

# ------------------------------------------------------------------ the oracle -------------


def _embedding_grads(tokens, g, V, padding_idx):
    """(B, V, p) float64 per-example gradients of a lookup (torch.func)."""
    return oracle.embedding_per_example_grads(tokens, g, V, padding_idx).cpu()


def _linear_grads(x, g):
    """(B, rows, cols) float64 per-example gradients Σ_s G_sᵀ x_s (torch.func)."""
    return oracle.linear_per_example_grads(x, g, bias=False)[0].cpu()


def _dot(a, b):
    return (a * b).flatten(1).sum(1)


def _tensors(B, T, S, p, V, dtype, device, seed=0, repeated=False, strided=False):
    gen = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 3 if repeated else V, (B, T), generator=gen)
    ge = torch.randn(B, T, p, generator=gen)
    x = torch.randn(B, S, p, generator=gen)
    gh = torch.randn(B, S, V, generator=gen)
    if strided:  # x and the head's gradient as views of sequence-first tensors
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        gh = gh.transpose(0, 1).contiguous().transpose(0, 1)
    return (
        tok.to(device),
        ge.to(device=device, dtype=dtype),
        x.to(device=device, dtype=dtype),
        gh.to(device=device, dtype=dtype),
    )


SHAPES = [  # B, T, S, p, V
    (3, 5, 7, 6, 11),
    (1, 1, 1, 4, 5),
    (2, 1, 9, 8, 17),
    (4, 33, 1, 5, 23),
    (2, 40, 37, 9, 50),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
@pytest.mark.parametrize("variant", ["plain", "repeated", "strided"])
def test_embedding_linear_cross_matches_oracle(device, backend, shape, padding_idx, variant):
    B, T, S, p, V = shape
    tok, ge, x, gh = _tensors(
        B, T, S, p, V, torch.float32, device, repeated=variant == "repeated", strided=variant == "strided"
    )
    got = functional.embedding_linear_cross(tok, ge, x, gh, padding_idx=padding_idx, backend=backend)
    ref = _dot(_embedding_grads(tok, ge, V, padding_idx), _linear_grads(x, gh))
    assert got.dtype == torch.float32 and got.shape == (B,)
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max() + 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_embedding_linear_cross_half_precision(device, backend, dtype):
    B, T, S, p, V = 3, 19, 21, 24, 29
    tok, ge, x, gh = _tensors(B, T, S, p, V, dtype, device)
    got = functional.embedding_linear_cross(tok, ge, x, gh, backend=backend)
    ref = _dot(_embedding_grads(tok, ge, V, None), _linear_grads(x, gh))  # from the rounded inputs
    torch.testing.assert_close(got.double().cpu(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_backends_agree_on_the_cross_term(device):
    from conftest import triton_runnable

    if not triton_runnable(device):
        pytest.skip("Triton cannot run here")
    tok, ge, x, gh = _tensors(5, 70, 45, 33, 61, torch.float32, device, seed=4)
    a = functional.embedding_linear_cross(tok, ge, x, gh, padding_idx=0, backend="torch")
    b = functional.embedding_linear_cross(tok, ge, x, gh, padding_idx=0, backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_other_cross_terms_match_oracle():
    gen = torch.Generator().manual_seed(1)
    B, V, p = 3, 13, 6
    x1, g1 = torch.randn(B, 4, p, generator=gen), torch.randn(B, 4, V, generator=gen)
    x2, g2 = torch.randn(B, 1, p, generator=gen), torch.randn(B, 1, V, generator=gen)
    t1, e1 = torch.randint(0, 4, (B, 5), generator=gen), torch.randn(B, 5, p, generator=gen)
    t2, e2 = torch.randint(0, 4, (B, 7), generator=gen), torch.randn(B, 7, p, generator=gen)
    dense = torch.randn(B, V, p, generator=gen)
    lin1, lin2 = ties.LinearUse(x1, g1), ties.LinearUse(x2, g2)
    tok1, tok2 = ties.TokenUse(t1, e1, V, 1), ties.TokenUse(t2, e2, V, 1)
    per = {
        id(lin1): _linear_grads(x1, g1),
        id(lin2): _linear_grads(x2, g2),
        id(tok1): _embedding_grads(t1, e1, V, 1),
        id(tok2): _embedding_grads(t2, e2, V, 1),
    }
    den = ties.DenseUse(dense)
    per[id(den)] = dense.double()
    for a, b in [(lin1, lin2), (tok1, tok2), (den, lin1), (tok1, den), (den, den), (lin2, tok2)]:
        got = ties.cross_term(a, b, backend="torch")
        torch.testing.assert_close(got.double(), _dot(per[id(a)], per[id(b)]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ tied models --------------


class TiedLM(nn.Module):
    """Embedding → (mixing linear) → head with the embedding's weight; optionally a second lookup of
    the same table (an encoder/decoder pair) and an untied bias on the head."""

    def __init__(self, V=19, p=6, second_lookup=False, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(V, p, padding_idx=padding_idx)
        self.emb2 = nn.Embedding(V, p, padding_idx=padding_idx) if second_lookup else None
        if second_lookup:
            self.emb2.weight = self.emb.weight
        self.mix = nn.Linear(p, p)
        self.head = nn.Linear(p, V)
        self.head.weight = self.emb.weight

    def forward(self, ids, ids2=None):
        h = torch.tanh(self.mix(self.emb(ids)))
        if self.emb2 is not None:
            h = h + self.emb2(ids2).mean(1, keepdim=True)
        return self.head(h)


class TiedLinears(nn.Module):
    """Two linear layers with one weight (e.g. a shared projection), then a head."""

    def __init__(self, d=5):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).mean(1))


def _lm_batch(B=6, T=5, V=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, V, (B, T), generator=g),
        torch.randint(0, V, (B, 4), generator=g),
        torch.randint(0, V, (B, T), generator=g),
    )


def _lm_loss(model, batch):
    ids, ids2, labels = batch
    out = model(ids, ids2) if model.emb2 is not None else model(ids)
    return F.cross_entropy(out.flatten(0, 1), labels.flatten())


def _linears_batch(B=6):
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, 4, 5, generator=g), torch.randint(0, 3, (B,), generator=g)


def _linears_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


MODELS = {
    "emb_head": (lambda: TiedLM(), _lm_batch, _lm_loss),
    "emb_emb_head_pad": (lambda: TiedLM(second_lookup=True, padding_idx=0), _lm_batch, _lm_loss),
    "linear_linear": (lambda: TiedLinears(), _linears_batch, _linears_loss),
}


@pytest.mark.parametrize("clipping", ["flat", "automatic", "per_layer"])
@pytest.mark.parametrize("name", list(MODELS))
def test_tied_models_are_exact(name, clipping, backend, device):
    if device.type != "cpu":
        pytest.skip("verify runs the model on its own device: covered on CPU")
    torch.manual_seed(0)
    build, batch, loss = MODELS[name]
    report = dpkernels.verify(build(), loss, batch(), clipping=clipping, backend=backend)
    assert report.ok, str(report)
    assert report.clipped_fraction >= 0.5


def test_group_clipping_keeps_a_tie_in_one_group():
    torch.manual_seed(0)
    model = TiedLM()
    report = dpkernels.verify(
        model, _lm_loss, _lm_batch(), clipping="group", groups=[["emb", "head"], ["mix"]], backend="torch"
    )
    assert report.ok, str(report)
    with pytest.raises(ValueError, match="share a parameter.*one clipping group"):
        dpkernels.verify(model, _lm_loss, _lm_batch(), clipping="group", groups=[["emb", "mix"], ["head"]])


def _step(model, batches, sigma=0.9, seed=11):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=sigma, max_grad_norm=0.5, expected_batch_size=6, seed=seed, backend="torch"
    )
    for i, b in enumerate(batches):
        _lm_loss(model, b).backward()
        if i + 1 < len(batches):
            opt.accumulate()
    opt.write_private_grads()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, opt


def test_accumulation_with_ties_equals_one_step():
    torch.manual_seed(0)
    base = TiedLM(second_lookup=True)
    ids, ids2, labels = _lm_batch()
    whole, _ = _step(copy.deepcopy(base), [(ids, ids2, labels)])
    split, _ = _step(copy.deepcopy(base), [(ids[:2], ids2[:2], labels[:2]), (ids[2:], ids2[2:], labels[2:])])
    for n in whole:
        torch.testing.assert_close(split[n], whole[n], rtol=1e-5, atol=1e-6, msg=n)


def test_a_tied_parameter_gets_its_noise_once():
    """The tied table's gradient with noise minus without is one draw of its own stream (std σC/B̄, not
    √3 times that for three uses), and differs from every other parameter's noise."""
    torch.manual_seed(0)
    base = TiedLM(V=200, p=16, second_lookup=True)
    batch = _lm_batch(V=200)
    clean, _ = _step(copy.deepcopy(base), [batch], sigma=0.0)
    noisy, opt = _step(copy.deepcopy(base), [batch], sigma=1.0)
    table = dict(opt.dp_modules)["emb"].weight
    noise = noisy["emb.weight"] - clean["emb.weight"]
    expected = philox_noise(opt._key(table, "emb.weight"), table.shape, opt.noise_std).float()
    torch.testing.assert_close(noise, expected, rtol=1e-4, atol=1e-6)
    assert abs(float(noise.std()) / opt.noise_std - 1.0) < 0.05  # one draw: 3200 elements
    mix_noise = (noisy["mix.weight"] - clean["mix.weight"]).flatten()
    assert not torch.allclose(mix_noise, noise.flatten()[: mix_noise.numel()])
