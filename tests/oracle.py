"""Independent oracle: per-example gradients from torch.func, in float64.

Nothing here imports dpkernels. Every quantity the package computes without materialising
per-example gradients (norms, clipped sums, a whole DP-SGD step) is checked against the
per-example gradients computed here the slow, obvious way: ``vmap(grad(loss_of_one_example))``.
"""

from __future__ import annotations

import copy
import zlib
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

# ------------------------------------------------------------------ one linear layer ------


def linear_per_example_grads(
    x: torch.Tensor, grad_output: torch.Tensor, bias: bool = True
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-example (weight, bias) gradients of y = x Wᵀ + b, given G = ∂L/∂y, in float64.

    x: (B, d) or (B, *, d); grad_output: (B, p) or (B, *, p). Example i's loss is taken to be
    ⟨y_i, G_i⟩, whose gradient w.r.t. the layer's output is G_i, so its parameter gradients are
    the layer's per-example gradients. Returns ((B, p, d), (B, p) or None).
    """
    x = x.detach().to(torch.float64)
    g = grad_output.detach().to(torch.float64)
    d, p = x.shape[-1], g.shape[-1]
    w = torch.zeros(p, d, dtype=torch.float64, device=x.device)
    b = torch.zeros(p, dtype=torch.float64, device=x.device)

    def loss_one(w_, b_, x_i, g_i):
        y = F.linear(x_i, w_, b_ if bias else None)
        return (y * g_i).sum()

    argnums = (0, 1) if bias else (0,)
    grads = vmap(grad(loss_one, argnums=argnums), in_dims=(None, None, 0, 0))(w, b, x, g)
    return grads[0], (grads[1] if bias else None)


def linear_sq_norms_oracle(x: torch.Tensor, grad_output: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """Σ ‖g_i‖² over weight (+ bias), float64 (B,)."""
    gw, gb = linear_per_example_grads(x, grad_output, bias)
    norms = gw.flatten(1).square().sum(1)
    if gb is not None:
        norms = norms + gb.square().sum(1)
    return norms


def linear_clipped_sum_oracle(
    x: torch.Tensor, grad_output: torch.Tensor, clip_factors: torch.Tensor, bias: bool = True
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(Σ_i c_i gW_i, Σ_i c_i gb_i) in float64."""
    gw, gb = linear_per_example_grads(x, grad_output, bias)
    c = clip_factors.detach().to(torch.float64)
    sw = torch.einsum("i,ipd->pd", c, gw)
    sb = torch.einsum("i,ip->p", c, gb) if gb is not None else None
    return sw, sb


# ------------------------------------------------------------------ linear test inputs ----


def _scaled(t: torch.Tensor) -> torch.Tensor:
    """Give each example its own scale, so that mixing examples up changes the answer."""
    scale = torch.linspace(0.5, 2.0, t.shape[0], device=t.device).view(-1, *([1] * (t.dim() - 1)))
    return t * scale


def make_linear_inputs(case: str, device, dtype=torch.float32):
    """(x, grad_output) for a named case; values rounded to ``dtype``."""
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))  # fixed per case

    def rnd(*shape):
        return _scaled(torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    kind, dims = case.split(":")
    n = [int(v) for v in dims.split("x")]
    if kind == "2d":  # B, d, p
        B, d, p = n
        return rnd(B, d), rnd(B, p)
    if kind == "3d":  # B, T, d, p
        B, T, d, p = n
        return rnd(B, T, d), rnd(B, T, p)
    if kind == "4d":  # B, T1, T2, d, p
        B, T1, T2, d, p = n
        return rnd(B, T1, T2, d), rnd(B, T1, T2, p)
    if kind == "2d_transposed":  # x and G stored feature-major: (B, d) views of (d, B) tensors
        B, d, p = n
        return rnd(d, B).t(), rnd(p, B).t()
    if kind == "3d_strided":  # x = big[:, ::2, :], G = a permuted (T, B, p) tensor
        B, T, d, p = n
        x = rnd(B, 2 * T, d + 3)[:, ::2, 1 : d + 1]
        gg = rnd(T, B, p).permute(1, 0, 2)
        return x, gg
    if kind == "4d_permuted":  # not viewable as (B, T, d): the dispatcher has to copy or stride right
        B, T1, T2, d, p = n
        x = rnd(T2, B, d, T1).permute(1, 3, 0, 2)
        gg = rnd(B, T2, T1, p).transpose(1, 2)
        return x, gg
    if kind == "3d_expanded":  # stride-0 views: x one row broadcast to every example, G constant over T
        B, T, d, p = n
        return rnd(1, 1, d).expand(B, T, d), rnd(B, 1, p).expand(B, T, p)
    raise ValueError(case)


LINEAR_CASES = [
    "2d:1x1x1",
    "2d:3x7x33",
    "2d:5x70x75",  # T = 1 (rowwise norms); d, p > 64: several tiles of the clipped-sum GEMM
    "2d:2x300x5",  # d past one 256-wide block of the rowwise kernel
    "2d:2x5x300",  # p past it
    "3d:1x1x33x45",  # T = 1 through the 3-D path
    "3d:3x7x33x45",
    "3d:2x70x7x33",  # T = 70: two ghost tiles of 64 (diagonal and off-diagonal)
    "3d:2x5x70x75",  # d, p > 64: several direct tiles in both directions
    "3d:1x33x1x1",
    "4d:2x3x5x7x45",
    "2d_transposed:4x33x7",
    "3d_strided:3x9x33x45",
    "4d_permuted:2x3x5x7x45",
    "3d_expanded:3x5x7x40",
]

# ------------------------------------------------------------------ models ----------------


def example_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of ONE example (no batch dim) from its output and target.

    "ce": cross-entropy; output (k,) or (T, k), target () or (T,) class indices, summed over T.
    "sq": sum of squares of (output - target), summed over every position.
    "sum": the sum of the outputs (the target is ignored): its output gradient is all ones.
    """
    if kind == "ce":

        def ce(out, target):
            if out.dim() == 1:
                return F.cross_entropy(out.unsqueeze(0), target.unsqueeze(0), reduction="sum")
            return F.cross_entropy(out, target, reduction="sum")

        return ce
    if kind == "sq":
        return lambda out, target: (out - target).square().sum()
    if kind == "sum":
        return lambda out, target: out.sum()
    raise ValueError(kind)


def batch_loss(kind: str, out: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """Batched loss the training loop uses: per-example losses (as in ``example_loss``), mean or sum over B."""
    if kind == "ce":
        per_pos = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="none")
        per_example = per_pos.reshape(out.shape[0], -1).sum(1)
    elif kind == "sq":
        per_example = (out - target).square().reshape(out.shape[0], -1).sum(1)
    elif kind == "sum":
        return out.sum() / (out.shape[0] if reduction == "mean" else 1)  # G is an expanded (stride-0) tensor
    else:
        raise ValueError(kind)
    return per_example.mean() if reduction == "mean" else per_example.sum()


def model_per_example_grads(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss: str
) -> Dict[str, torch.Tensor]:
    """Per-example gradients of every trainable parameter of ``model``, float64, name → (B, *shape).

    A float64 deep copy of the model is used; ``model`` itself is not touched.
    """
    m64 = copy.deepcopy(model).to(torch.float64)
    params = {n: p.detach() for n, p in m64.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in m64.named_buffers()}
    loss_fn = example_loss(loss)
    x64 = x.detach().to(torch.float64)
    tgt = target.detach()
    if tgt.is_floating_point():
        tgt = tgt.to(torch.float64)

    def loss_one(prms, x_i, t_i):
        out = functional_call(m64, (prms, buffers), (x_i.unsqueeze(0),)).squeeze(0)
        return loss_fn(out, t_i)

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x64, tgt)


def flat_clipped_mean(
    per_example: Dict[str, torch.Tensor], max_grad_norm: float, denom: float
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Flat clipping across ALL parameters: (Σ_i min(1, C/(‖g_i‖+1e-6)) g_i) / denom, and the norms ‖g_i‖."""
    B = next(iter(per_example.values())).shape[0]
    sq = sum(g.reshape(B, -1).square().sum(1) for g in per_example.values())
    norms = sq.sqrt()
    c = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    out = {n: torch.einsum("i,i...->...", c, g) / denom for n, g in per_example.items()}
    return out, norms


# ------------------------------------------------------------------ embedding -------------


def embedding_per_example_grads(
    tokens: torch.Tensor, grad_output: torch.Tensor, num_embeddings: int, padding_idx: Optional[int] = None
) -> torch.Tensor:
    """Per-example gradients of an embedding table, float64 (B, V, p), given G = ∂L/∂output.

    tokens: (B,) or (B, *) integer ids; grad_output: tokens.shape + (p,). Example i's loss is
    ⟨F.embedding(tok_i, W), G_i⟩, whose gradient w.r.t. W is the layer's per-example gradient.
    """
    g = grad_output.detach().to(torch.float64)
    w = torch.zeros(num_embeddings, g.shape[-1], dtype=torch.float64, device=g.device)

    def loss_one(w_, tok_i, g_i):
        return (F.embedding(tok_i, w_, padding_idx) * g_i).sum()

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(w, tokens.detach().long(), g)


def embedding_sq_norms_oracle(
    tokens, grad_output, num_embeddings: int, padding_idx: Optional[int] = None
) -> torch.Tensor:
    """‖g_i‖², float64 (B,)."""
    return embedding_per_example_grads(tokens, grad_output, num_embeddings, padding_idx).flatten(1).square().sum(1)


def embedding_clipped_sum_oracle(
    tokens, grad_output, clip_factors: torch.Tensor, num_embeddings: int, padding_idx: Optional[int] = None
) -> torch.Tensor:
    """Σ_i c_i g_i, float64 (V, p)."""
    per_example = embedding_per_example_grads(tokens, grad_output, num_embeddings, padding_idx)
    return torch.einsum("i,ivp->vp", clip_factors.detach().to(torch.float64), per_example)


class _TokensAsFloat(nn.Module):
    """``inner`` fed integer ids that arrive float-encoded (model_per_example_grads casts inputs to
    float64; ids are exact in float64), optionally transposed to sequence-first (T, B)."""

    def __init__(self, inner: nn.Module, seq_first: bool) -> None:
        super().__init__()
        self.inner = inner
        self.seq_first = seq_first

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        return self.inner(ids.transpose(0, 1) if self.seq_first else ids)


def token_model_per_example_grads(
    model: nn.Module, tokens: torch.Tensor, target: torch.Tensor, loss: str, seq_first: bool = False
) -> Dict[str, torch.Tensor]:
    """``model_per_example_grads`` for a model whose input is token ids (B, *), batch first.

    ``seq_first``: the model itself takes (T, B) ids; ``tokens`` are still given (B, T).
    """
    grads = model_per_example_grads(_TokensAsFloat(model, seq_first), tokens, target, loss)
    return {name.removeprefix("inner."): g for name, g in grads.items()}


# ------------------------------------------------------------------ convolution -----------


def conv_per_example_grads(conv: nn.Module, x: torch.Tensor, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-example gradients of an nn.Conv1d / nn.Conv2d's parameters, float64, name → (B, *shape).

    Example i's loss is ⟨conv(x_i), G_i⟩ (G = ∂L/∂output), so these are the layer's per-example
    gradients. A float64 copy of the torch layer itself runs (its padding, padding_mode, groups).
    """
    m64 = copy.deepcopy(conv).to(torch.float64)
    params = {n: p.detach() for n, p in m64.named_parameters()}

    def loss_one(prms, x_i, g_i):
        return (functional_call(m64, prms, (x_i.unsqueeze(0),)) * g_i.unsqueeze(0)).sum()

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x.detach().double(), grad_output.detach().double())
