"""DPMultiheadAttention: the same outputs as nn.MultiheadAttention, and a private step equal to
clipping the per-example gradients of nn.MultiheadAttention itself.

The oracle runs the torch module one example at a time (a batch of one, autograd), in float64:
independent of the packed/split projection paths and of the attention re-implementation.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpkernels
from dpkernels.nn import DPLinear, DPMultiheadAttention

from oracle import flat_clipped_mean

E, H = 12, 3


def _mha(**kw) -> nn.MultiheadAttention:
    torch.manual_seed(kw.pop("seed", 0))
    m = nn.MultiheadAttention(E, H, **kw)
    with torch.no_grad():  # biases away from zero so that a lost bias gradient shows
        for n, p in m.named_parameters():
            if "bias" in n:
                p.normal_(0, 0.3)
    return m


def _inputs(N: int, L: int, S: int, batch_first: bool, kdim: int = E, vdim: int = E, seed: int = 1):
    g = torch.Generator().manual_seed(seed)

    def make(T, d):
        t = torch.randn(N, T, d, generator=g)
        return t if batch_first else t.transpose(0, 1).contiguous()

    return make(L, E), make(S, kdim), make(S, vdim)


MASK_CASES = ["none", "bool_attn", "float_attn_3d", "key_padding", "both"]


def _masks(case: str, N: int, L: int, S: int):
    g = torch.Generator().manual_seed(7)
    attn, kpm = None, None
    if case in ("bool_attn", "both"):
        attn = torch.rand(L, S, generator=g) < 0.3
        attn[:, 0] = False  # every query sees at least one key
    if case == "float_attn_3d":
        attn = torch.randn(N * H, L, S, generator=g)
    if case in ("key_padding", "both"):
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[0, -2:] = True
    return attn, kpm


class _Net(nn.Module):
    """Attention (self or cross) over a sequence, mean over positions, a linear head. The masks are
    arguments, not model state: per-example masks held by the model would not follow the batch."""

    def __init__(self, mha: nn.MultiheadAttention, cross: bool) -> None:
        super().__init__()
        self.attn = mha
        self.head = nn.Linear(E, 3)
        self.cross = cross

    def forward(self, q, k, v, attn_mask=None, kpm=None):
        if not self.cross:
            k = v = q
        out, _ = self.attn(q, k, v, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=False)
        return self.head(out.mean(dim=1 if self.attn.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_case", MASK_CASES)
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_same_outputs_as_torch(batch_first, mask_case, need_weights, average):
    N, L, S = 2, 5, 7
    ref = _mha(batch_first=batch_first).eval()
    dp = DPMultiheadAttention.from_multihead_attention(copy.deepcopy(ref)).eval()
    q, k, v = _inputs(N, L, S, batch_first)
    attn_mask, kpm = _masks(mask_case, N, L, S)
    kw = dict(attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=average)
    out_ref, w_ref = ref(q, k, v, **kw)
    # the private path reimplements the attention: attach an engine to exercise it (the layer is the
    # model, so its own layout is the input's)
    dpkernels.make_private(
        dp,
        torch.optim.SGD(dp.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=N,
        backend="torch",
        batch_first=batch_first,
    )
    out, w = dp(q, k, v, **kw)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    else:
        assert w is None and w_ref is None


@pytest.mark.parametrize(
    "options", [dict(kdim=5, vdim=7), dict(add_zero_attn=True), dict(bias=False), dict(add_bias_kv=True)]
)
def test_same_outputs_with_options(options):
    N, L, S = 3, 4, 6
    ref = _mha(batch_first=True, **options).eval()
    dp = DPMultiheadAttention.from_multihead_attention(copy.deepcopy(ref)).eval()
    if dp.bias_k is not None:
        dp.bias_k.requires_grad_(False)
        dp.bias_v.requires_grad_(False)
    q, k, v = _inputs(N, L, S, True, options.get("kdim", E), options.get("vdim", E))
    attn_mask, kpm = _masks("both", N, L, S)
    dpkernels.make_private(
        dp,
        torch.optim.SGD([p for p in dp.parameters() if p.requires_grad], lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=N,
        backend="torch",
    )
    for kw in (dict(need_weights=False), dict(attn_mask=attn_mask, key_padding_mask=kpm)):
        out_ref, _ = ref(q, k, v, **kw)
        out, _ = dp(q, k, v, **kw)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)


def test_state_dict_and_conversion():
    ref = _mha()
    model = dpkernels.nn.convert(nn.Sequential(copy.deepcopy(ref)))
    assert type(model[0]) is DPMultiheadAttention and type(model[0].out_proj) is DPLinear
    assert list(model[0].state_dict().keys()) == list(ref.state_dict().keys())
    for (n, a), b in zip(model[0].state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)


def _oracle_step(ref_net: _Net, q, k, v, y, C: float, batch_first: bool, masks=(None, None)):
    """Flat-clipped mean of per-example gradients, one example at a time through the torch layer."""
    net = copy.deepcopy(ref_net).double()
    bd = 0 if batch_first else 1
    N = q.shape[bd]
    per_example = {n: [] for n, p in net.named_parameters() if p.requires_grad}
    attn_mask, kpm = masks
    for i in range(N):
        sl = [slice(None)] * 3
        sl[bd] = slice(i, i + 1)
        one = (
            attn_mask if attn_mask is None or attn_mask.dim() == 2 else attn_mask[i * H : (i + 1) * H],
            kpm[i : i + 1] if kpm is not None else None,
        )
        loss = F.cross_entropy(
            net(q[tuple(sl)].double(), k[tuple(sl)].double(), v[tuple(sl)].double(), *one),
            y[i : i + 1],
            reduction="sum",
        )
        params = [p for p in net.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params)
        for (n, _), gr in zip([(n, p) for n, p in net.named_parameters() if p.requires_grad], grads):
            per_example[n].append(gr)
    per_example = {n: torch.stack(g) for n, g in per_example.items()}
    return flat_clipped_mean(per_example, C, N)


@pytest.mark.parametrize(
    "cross,batch_first,mask_case,options",
    [
        (False, True, "none", {}),  # packed self-attention: one fused product
        (False, False, "both", {}),  # sequence-first, masks
        (True, True, "key_padding", {}),  # cross-attention into the packed weight: split products
        (True, False, "float_attn_3d", dict(kdim=5, vdim=7)),  # separate q/k/v weights
        (False, True, "none", dict(bias=False)),
    ],
)
def test_private_step_matches_the_oracle(device, backend, cross, batch_first, mask_case, options):
    N, L = 4, 5
    S = 6 if cross else L
    mha = _mha(batch_first=batch_first, **options)
    q, k, v = _inputs(N, L, S, batch_first, options.get("kdim", E), options.get("vdim", E))
    masks = _masks(mask_case, N, L, S)
    y = torch.tensor([0, 2, 1, 2])
    ref_net = _Net(mha, cross)
    expected, norms = _oracle_step(ref_net, q, k, v, y, 1.0, batch_first, masks)
    C = float(norms.median())

    expected, _ = _oracle_step(ref_net, q, k, v, y, C, batch_first, masks)
    net = copy.deepcopy(ref_net).to(device)
    masks = tuple(m.to(device) if m is not None else None for m in masks)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    # the model's input is the attention's: sequence-first when the attention is
    net, opt = dpkernels.make_private(
        net, opt, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=N, backend=backend, batch_first=batch_first
    )
    F.cross_entropy(net(q.to(device), k.to(device), v.to(device), *masks), y.to(device)).backward()
    opt.write_private_grads()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad.double().cpu(), expected[n], rtol=2e-4, atol=2e-6, msg=n)


def test_packed_and_split_paths_draw_the_same_noise():
    """The packed in_proj_weight (and in_proj_bias) get philox_normal over their flat index, whichever
    product ran: the gradient with noise minus the one without is exactly that draw."""
    mha = _mha(batch_first=True)
    q, k, v = _inputs(3, 4, 4, True)
    for cross in (False, True):  # packed product / split products into the packed weight
        grads = {}
        base = _Net(mha, cross)
        for sigma in (0.0, 1.0):
            net = copy.deepcopy(base)
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            net, opt = dpkernels.make_private(
                net, opt, noise_multiplier=sigma, max_grad_norm=0.7, expected_batch_size=3, seed=5, backend="torch"
            )
            net(q, k, v).sum().backward()
            opt.write_private_grads()
            grads[sigma] = {n: p.grad.clone() for n, p in net.named_parameters()}
        for name in ("in_proj_weight", "in_proj_bias"):
            param = getattr(net.attn, name)
            expected = dpkernels.functional.gaussian_noise(
                param.shape, std=opt.noise_std, generator=opt._key(param, f"attn.{name}"), backend="torch"
            )
            torch.testing.assert_close(
                grads[1.0][f"attn.{name}"] - grads[0.0][f"attn.{name}"],
                expected,
                rtol=1e-5,
                atol=1e-6,
                msg=f"{name} cross={cross}",
            )


def test_refusals():
    with pytest.raises(ValueError, match="add_bias_kv=True: bias_k/bias_v have no per-example clipping path"):
        net = nn.Sequential(_mha(add_bias_kv=True))
        dpkernels.make_private(
            net,
            torch.optim.SGD(net.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=2,
        )
    net = _mha(batch_first=True)
    net, _ = dpkernels.make_private(
        net, torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2
    )
    x = torch.randn(5, E)
    with pytest.raises(ValueError, match="needs batched input"):
        net(x, x, x)
    with pytest.raises(ValueError, match="empty batch"):
        z = torch.randn(0, 5, E)
        net(z, z, z)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        y = torch.randn(2, 5, E)
        net(y, y, y, is_causal=True)


def test_frozen_projections_with_trainable_out_proj():
    mha = _mha(batch_first=True)
    mha.in_proj_weight.requires_grad_(False)
    mha.in_proj_bias.requires_grad_(False)
    net = _Net(mha, cross=False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net, opt = dpkernels.make_private(
        net, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=2, backend="torch"
    )
    q, _, _ = _inputs(2, 3, 3, True)
    net(q, q, q).sum().backward()
    opt.step()
    assert net.attn.in_proj_weight.grad is None and net.attn.out_proj.weight.grad is not None
