"""Cross terms of a tied parameter: ⟨g_i^(u), g_i^(v)⟩ of two uses u, v, never forming g_i.

A parameter P used by several layers (an embedding table that is also the output head's weight,
one table behind an encoder, a decoder and a head) has per-example gradient g_i = Σ_u g_i^(u),
so

    ‖g_i‖² = Σ_u ‖g_i^(u)‖² + 2 Σ_{u<v} ⟨g_i^(u), g_i^(v)⟩

The squares are each layer's own norm; the cross terms come from what backprop already has.
With P of shape (V, p) seen by each use as

    token use    g_i = Σ_t e_{tok_it} G_itᵀ                  (an embedding: tok (B, T), G (B, T, p))
    linear use   g_i = Σ_s H_isᵀ x_is                        (a linear layer y = x Pᵀ: x (B, S, p), H (B, S, V))
    dense use    g_i given                                   (per-example gradients, (B, V, p))

the cross terms are

    token × linear   Σ_t Σ_s H_{s, tok_t} (x_s · G_t)         an S×T tile computation with a gather
    linear × linear  Σ_{s,s'} (x_s · x'_{s'}) (H_s · H'_{s'})  the ghost form across two uses
    token × token    Σ_{t,t': tok_t = tok'_{t'}} G_t · G'_{t'}
    dense × linear   Σ_s H_s · (g_i x_s)
    dense × token    Σ_t g_i[tok_t] · G_t
    dense × dense    ⟨g_i, g'_i⟩

(a linear layer storing Pᵀ, as GPT-2's Conv1D does, is a linear use with x and H swapped).
Positions holding the embedding's padding_idx add nothing. Every result is float32 (B,) with
float32 accumulation.

token × linear, the embedding-and-output-head tie of language models, has a Triton kernel: one
program per (example, S-tile, T-tile) forms the tile x_s · G_t with tl.dot over p, gathers
H_{s, tok_t} for the same tile (S·T entries of the vocabulary-sized H per example, never all
of V) and reduces; cost ≈ B·S·T·p multiply-adds. The others run as torch references: they
are either small (dense) or the rarer ties (two linear uses, two embeddings).
"""

from __future__ import annotations

import torch

from ._library import kernel_op
from ._triton import HAS_TRITON, dot_flags, tl, triton

# examples per reference chunk: the (chunk, S, T) products stay under 2^24 elements
_CHUNK_ELEMENTS = 2**24


def _chunks(B: int, per_example: int):
    step = max(1, _CHUNK_ELEMENTS // max(per_example, 1))
    for start in range(0, B, step):
        yield slice(start, min(B, start + step))


# ---------------------------------------------------------------- torch references ----------


def token_linear_cross_reference(
    tokens: torch.Tensor, g_emb: torch.Tensor, x: torch.Tensor, g_head: torch.Tensor, padding_idx: int
) -> torch.Tensor:
    """tokens (B, T), g_emb (B, T, p), x (B, S, p), g_head (B, S, V) → float32 (B,)."""
    B, T = tokens.shape
    S = x.shape[1]
    out = torch.empty(B, dtype=torch.float32, device=x.device)
    for sl in _chunks(B, S * T):
        tok = tokens[sl].long()
        keep = (tok != padding_idx).float()
        prod = torch.bmm(x[sl].float(), g_emb[sl].float().transpose(1, 2))  # (b, S, T): x_s · G_t
        gathered = g_head[sl].float().gather(2, tok.clamp_min(0)[:, None, :].expand(-1, S, -1))  # H_{s, tok_t}
        out[sl] = (prod * gathered * keep[:, None, :]).sum(dim=(1, 2))
    return out


def linear_linear_cross_reference(
    x1: torch.Tensor, g1: torch.Tensor, x2: torch.Tensor, g2: torch.Tensor
) -> torch.Tensor:
    """x1 (B, S1, d), g1 (B, S1, p), x2 (B, S2, d), g2 (B, S2, p) → float32 (B,)."""
    B, S1 = x1.shape[:2]
    S2 = x2.shape[1]
    out = torch.empty(B, dtype=torch.float32, device=x1.device)
    for sl in _chunks(B, S1 * S2):
        xx = torch.bmm(x1[sl].float(), x2[sl].float().transpose(1, 2))
        gg = torch.bmm(g1[sl].float(), g2[sl].float().transpose(1, 2))
        out[sl] = (xx * gg).sum(dim=(1, 2))
    return out


def token_token_cross_reference(
    tok1: torch.Tensor, g1: torch.Tensor, tok2: torch.Tensor, g2: torch.Tensor, padding_idx: int
) -> torch.Tensor:
    """tok1 (B, T1), g1 (B, T1, p), tok2 (B, T2), g2 (B, T2, p) → float32 (B,)."""
    B, T1 = tok1.shape
    T2 = tok2.shape[1]
    out = torch.empty(B, dtype=torch.float32, device=g1.device)
    for sl in _chunks(B, T1 * T2):
        a, b = tok1[sl].long(), tok2[sl].long()
        same = (a[:, :, None] == b[:, None, :]) & (a != padding_idx)[:, :, None] & (b != padding_idx)[:, None, :]
        gg = torch.bmm(g1[sl].float(), g2[sl].float().transpose(1, 2))
        out[sl] = (gg * same).sum(dim=(1, 2))
    return out


def dense_linear_cross_reference(per_example: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """per_example (B, p, d), x (B, S, d), g (B, S, p) → float32 (B,): Σ_s g_s · (P_i x_s)."""
    return torch.einsum("bsp,bpd,bsd->b", g.float(), per_example.float(), x.float())


def dense_token_cross_reference(
    per_example: torch.Tensor, tokens: torch.Tensor, g: torch.Tensor, padding_idx: int
) -> torch.Tensor:
    """per_example (B, V, p), tokens (B, T), g (B, T, p) → float32 (B,): Σ_t P_i[tok_t] · G_t."""
    tok = tokens.long()
    rows = per_example.float().gather(1, tok.clamp_min(0)[:, :, None].expand(-1, -1, per_example.shape[2]))
    keep = (tok != padding_idx).float()
    return ((rows * g.float()).sum(dim=2) * keep).sum(dim=1)


def dense_dense_cross_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, *shape) twice → float32 (B,)."""
    return (a.float().reshape(a.shape[0], -1) * b.float().reshape(b.shape[0], -1)).sum(dim=1)


# ---------------------------------------------------------------- Triton kernel -------------

if HAS_TRITON:
    from ._triton import dot_acc

    @triton.jit
    def _token_linear_cross_kernel(
        tok_ptr,
        ge_ptr,
        x_ptr,
        gh_ptr,
        out_ptr,
        S,
        T,
        p,
        pad,
        n_t_tiles,
        n_tiles,
        stb,
        stt,
        sgeb,
        sget,
        sgep,
        sxb,
        sxs,
        sxp,
        sghb,
        sghs,
        sghv,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # one program per (example, S-tile, T-tile), on a 1-D grid
        pid = tl.program_id(0).to(tl.int64)
        b = pid // n_tiles
        tile = pid % n_tiles
        rows_s = (tile // n_t_tiles) * BLOCK_S + tl.arange(0, BLOCK_S)
        rows_t = (tile % n_t_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_s = rows_s < S
        mask_t = rows_t < T
        rs = rows_s.to(tl.int64)
        rt = rows_t.to(tl.int64)
        tok = tl.load(tok_ptr + b * stb + rt * stt, mask=mask_t, other=pad)
        keep_t = mask_t & (tok != pad)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_S, BLOCK_T), dtype=tl.float32)
        for k in range(0, p, BLOCK_K):
            cols = (k + offs_k).to(tl.int64)
            cmask = (k + offs_k) < p
            xa = tl.load(
                x_ptr + b * sxb + rs[:, None] * sxs + cols[None, :] * sxp,
                mask=mask_s[:, None] & cmask[None, :],
                other=0.0,
            )
            ga = tl.load(
                ge_ptr + b * sgeb + rt[:, None] * sget + cols[None, :] * sgep,
                mask=keep_t[:, None] & cmask[None, :],
                other=0.0,
            )
            acc = dot_acc(acc, xa, tl.trans(ga), IEEE, UPCAST)
        h = tl.load(
            gh_ptr + b * sghb + rs[:, None] * sghs + tok.to(tl.int64)[None, :] * sghv,
            mask=mask_s[:, None] & keep_t[None, :],
            other=0.0,
        ).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(tl.sum(acc * h, axis=1), axis=0))


def token_linear_cross_triton(
    tokens: torch.Tensor, g_emb: torch.Tensor, x: torch.Tensor, g_head: torch.Tensor, padding_idx: int
) -> torch.Tensor:
    """The Triton kernel (any strides); same contract as the reference."""
    B, T = tokens.shape
    S, p = x.shape[1], x.shape[2]
    if S == 0 or T == 0:
        return torch.zeros(B, dtype=torch.float32, device=x.device)
    block_s = 16 if S <= 16 else 32
    block_t = 16 if T <= 16 else 32
    n_s, n_t = triton.cdiv(S, block_s), triton.cdiv(T, block_t)
    out = torch.empty((B, n_s * n_t), dtype=torch.float32, device=x.device)
    _token_linear_cross_kernel[(B * n_s * n_t,)](
        tokens,
        g_emb,
        x,
        g_head,
        out,
        S,
        T,
        p,
        padding_idx,
        n_t,
        n_s * n_t,
        tokens.stride(0),
        tokens.stride(1),
        g_emb.stride(0),
        g_emb.stride(1),
        g_emb.stride(2),
        x.stride(0),
        x.stride(1),
        x.stride(2),
        g_head.stride(0),
        g_head.stride(1),
        g_head.stride(2),
        **dot_flags(x.dtype),
        BLOCK_S=block_s,
        BLOCK_T=block_t,
        BLOCK_K=32,
    )
    return out.sum(dim=1)


# ---------------------------------------------------------------- the ops -----------------


def _cross_fake(*args) -> torch.Tensor:
    first = args[0]
    return args[1].new_empty(first.shape[0], dtype=torch.float32)


# dpkernels::*_cross (ops/_library.py): float32 (B,) cross terms; padding_idx -1 for none
TOKEN_LINEAR = kernel_op(
    "embedding_linear_cross",
    "(Tensor tokens, Tensor grad_embedding, Tensor x, Tensor grad_head, int padding_idx) -> Tensor",
    torch=token_linear_cross_reference,
    triton=token_linear_cross_triton,
    fake=_cross_fake,
)
LINEAR_LINEAR = kernel_op(
    "linear_linear_cross",
    "(Tensor x1, Tensor grad1, Tensor x2, Tensor grad2) -> Tensor",
    torch=linear_linear_cross_reference,
    fake=_cross_fake,
)
TOKEN_TOKEN = kernel_op(
    "embedding_embedding_cross",
    "(Tensor tokens1, Tensor grad1, Tensor tokens2, Tensor grad2, int padding_idx) -> Tensor",
    torch=token_token_cross_reference,
    fake=_cross_fake,
)
