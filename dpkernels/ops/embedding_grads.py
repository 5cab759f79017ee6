"""Per-example gradient norms and the clipped, noised gradient of an embedding table.

For token ids tok (B, T) into a table of V rows and G = ∂L/∂output (B, T, p), example i's
weight gradient is

    g_i = Σ_t e_{tok_it} G_itᵀ        (V × p; positions whose token is padding_idx add nothing)

so row v of g_i is the sum of G_it over the positions where example i has token v, and

    ‖g_i‖² = Σ_v ‖Σ_{t: tok_it = v} G_it‖² = Σ_{t,s: tok_it = tok_is} G_it·G_is

(repeated tokens add up before squaring). The step's gradient is

    Σ_i c_i g_i + σ_n·z        over the WHOLE (V, p) table

with z drawn by the Philox counter scheme of ``dpkernels/ops/philox.py`` (element = row-major
index in the table). Every row gets noise, always: which rows a batch touches depends on the
data, so noising only those would publish them.

Squared norms (float32 (B,), float32 accumulation whatever G's dtype)
    reference  sort-based, never a per-example (V, p) gradient: the rows of G sorted by
               key = i·V + tok, summed per distinct key (one (example, token) pair) in float32
               with padding rows left out, squared, summed per example.
    Triton     the ghost form: per example, the T×T plane is tiled and only tiles on and above
               the diagonal are visited (off-diagonal ones count twice); each tile pair forms
               G_t·G_s with tl.dot, keeps the entries with tok_t = tok_s (neither padding) and
               reduces, so no T×T matrix is stored. A tile pair with no such entry (a long
               stretch of padding, no repeated token) skips its dot products. T = 1: ‖G_i‖²,
               zero where the token is padding. Cost ≈ B·T·(T + b_T)·p/2 multiply-adds.

Small tables: per-example gradients
    When the table is small next to the ghost form's T×T work (V ≤ T(T+64)/2, e.g. T5's 32 × H
    relative-position buckets looked up T_q·T_k times per example) and B·V·p fits (2²⁴
    elements), the per-example gradients themselves are cheaper: g_i (V, p) float32, each the
    deterministic row sum of G_it by key i·V + tok_it (padding rows left out), so ‖g_i‖² is a
    sum of squares and the clipped sum goes through the fused clip-sum-noise over (B, V·p),
    whose noise is the same Philox draw per element as the row-scatter path's
    (``choose_embedding_method``, ``embedding_per_example_grads_reference``).

Clipped sum
    The rows c_i·G_it (float32) are summed into the table by PyTorch's own embedding backward,
    ``aten.embedding_dense_backward``, which is deterministic on every device: on CPU each row
    sums its indices in order; on CUDA, up to 3072 indices, one thread block owns each feature
    column and walks the indices in order (duplicates within a chunk are combined by the
    lowest-numbered warp in a fixed order), and above that the indices are radix-sorted
    (a stable sort, so equal tokens keep their position order), each token's rows are summed
    in fixed partial segments and the partials summed in order; no float atomics anywhere, so
    the result is bit-identical across runs (unlike index_add_/index_put_(accumulate=True),
    whose CUDA kernels add with atomics in an arbitrary order). That CUDA kernel indexes rows ×
    features with 32-bit ints, so calls are split into chunks of fewer than 2³¹ elements,
    whose results are added in a fixed order. The noise is then added in place: the torch
    reference adds ``philox_normal``; the Triton path runs ``_triton.add_noise_triton_`` (out += σ_n·z,
    the same draws), so no (V, p) noise tensor exists on the GPU. The result is cast to
    ``out_dtype`` (default G's dtype).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from ._library import kernel_op
from ._tiles import ghost_block_t, upper_triangle_pairs
from ._triton import HAS_TRITON, TunedLaunch, add_noise_triton_, configs, dot_flags, tl, triton
from .philox import PhiloxKey, add_normal_

# Elements per call of aten.embedding_dense_backward: its CUDA kernels index rows × (features
# rounded up to a warp) with 32-bit ints.
MAX_ELEMENTS_PER_SCATTER = 2**31 - 1


# ---------------------------------------------------------------- deterministic row sums ---


def _row_chunks(n_rows: int, p: int) -> Iterator[slice]:
    per_call = max(1, MAX_ELEMENTS_PER_SCATTER // (-(-max(p, 1) // 32) * 32))
    for start in range(0, n_rows, per_call):
        yield slice(start, min(start + per_call, n_rows))


def _sum_rows_by_index(
    rows_of: Callable[[slice], torch.Tensor], index: torch.Tensor, n_out: int, p: int, padding_idx: int = -1
) -> torch.Tensor:
    """out[v] = Σ_{r: index_r = v ≠ padding_idx} rows_r, float32 (n_out, p), deterministic.

    ``rows_of(slice)`` gives the float32 rows of a range of r (built per chunk, so at most one
    chunk of them exists at a time); ``index`` is int32/int64 (N,).
    """
    out = None
    for chunk in _row_chunks(index.shape[0], p):
        part = torch.ops.aten.embedding_dense_backward(rows_of(chunk), index[chunk], n_out, padding_idx, False)
        out = part if out is None else out.add_(part)
    if out is None:
        out = torch.zeros((n_out, p), dtype=torch.float32, device=index.device)
    return out


# ---------------------------------------------------------------- method choice ------------

# the most elements (B·V·p, float32) per-example gradients of a small table may take
MAX_PER_EXAMPLE_ELEMENTS = 2**24


def choose_embedding_method(B: int, T: int, V: int, p: int) -> str:
    """ "per_example" (materialise the (B, V, p) per-example gradients) when the table is small next
    to the ghost form's per-example T(T+64)/2 tile work and they fit; "rows" otherwise."""
    if V <= T * (T + 64) // 2 and B * V * p <= MAX_PER_EXAMPLE_ELEMENTS:
        return "per_example"
    return "rows"


# ---------------------------------------------------------------- torch reference ----------


def embedding_sq_norms_reference(
    tokens: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int
) -> torch.Tensor:
    """Sort-based reference (tokens (B, T), g (B, T, p); padding_idx -1 for none) → float32 (B,).

    No shape depends on the data (no host sync, and it runs on the meta device): the N = B·T
    rows are sorted by key = i·V + tok, numbered by distinct key (pair ids 0..U-1; ids U..N-1
    stay empty) and summed per id into (N, p) float32.
    """
    B, T, p = g.shape
    n = B * T
    tok = tokens.reshape(n).to(torch.int64)
    example = torch.arange(B, device=g.device).repeat_interleave(T)
    sorted_key, order = torch.sort(example * num_embeddings + tok, stable=True)
    new_pair = torch.ones_like(sorted_key)
    new_pair[1:] = sorted_key[1:] != sorted_key[:-1]
    pair = torch.cumsum(new_pair, 0) - 1
    rows = g.reshape(n, p)
    keep = tok != padding_idx

    def sorted_rows(chunk: slice) -> torch.Tensor:  # padding rows are ignored, not multiplied by 0
        r = order[chunk]
        return torch.where(keep[r, None], rows[r].float(), 0.0)

    per_pair = _sum_rows_by_index(sorted_rows, pair, n, p)
    sq = per_pair.square().sum(dim=1, keepdim=True)
    # the example of each pair (every row of a pair writes the same value; empty ids keep 0 and add 0)
    pair_example = torch.zeros_like(sorted_key).scatter_(0, pair, sorted_key // num_embeddings)
    return _sum_rows_by_index(lambda chunk: sq[chunk], pair_example, B, 1)[:, 0]


def embedding_per_example_grads_reference(
    tokens: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int
) -> torch.Tensor:
    """Per-example table gradients (tokens (B, T), g (B, T, p); padding_idx -1 for none) → float32
    (B, V, p): row v of example i is Σ_{t: tok_it = v} G_it, deterministic (padding rows add nothing)."""
    B, T, p = g.shape
    tok = tokens.reshape(B * T).to(torch.int64)
    key = torch.arange(B, device=g.device).repeat_interleave(T) * num_embeddings + tok
    rows = g.reshape(B * T, p)
    keep = tok != padding_idx

    def rows_of(chunk: slice) -> torch.Tensor:
        return torch.where(keep[chunk, None], rows[chunk].float(), 0.0)

    return _sum_rows_by_index(rows_of, key, B * num_embeddings, p).view(B, num_embeddings, p)


def _clipped_row_sum(
    tokens: torch.Tensor, g: torch.Tensor, clip_factors: torch.Tensor, num_embeddings: int, padding_idx: int
) -> torch.Tensor:
    """Σ_i c_i Σ_t e_{tok_it} G_itᵀ, float32 (V, p), deterministic (see the module docstring)."""
    B, T, p = g.shape
    rows = g.reshape(B * T, p)  # a view where the strides allow
    row_factor = clip_factors.repeat_interleave(T)

    def scaled(chunk: slice) -> torch.Tensor:  # c_i·G_it in float32 (type promotion: no half rounding)
        return torch.mul(rows[chunk], row_factor[chunk, None])

    return _sum_rows_by_index(scaled, tokens.reshape(-1), num_embeddings, p, padding_idx)


def embedding_clipped_grad_reference(
    tokens: torch.Tensor,
    g: torch.Tensor,
    clip_factors: torch.Tensor,
    num_embeddings: int,
    padding_idx: int,
    noise_std: float,
    key: PhiloxKey,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """torch reference (tokens (B, T), g (B, T, p)) → (V, p) in out_dtype (default g's)."""
    acc = _clipped_row_sum(tokens, g, clip_factors, num_embeddings, padding_idx)
    if noise_std != 0.0:
        add_normal_(acc, noise_std, key)
    return acc.to(out_dtype or g.dtype)


# ---------------------------------------------------------------- Triton kernels ----------

if HAS_TRITON:
    from ._tiles import gram_tile

    @triton.jit
    def _embedding_rowwise_kernel(tok_ptr, g_ptr, out_ptr, p, pad, stb, sgb, sgp, BLOCK: tl.constexpr):
        # T = 1: ‖G_i‖², or 0 where the token is padding
        b = tl.program_id(0).to(tl.int64)
        tok = tl.load(tok_ptr + b * stb)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(0, p, BLOCK):
            cols = k + offs
            v = tl.load(g_ptr + b * sgb + cols.to(tl.int64) * sgp, mask=cols < p, other=0.0).to(tl.float32)
            acc += v * v
        tl.store(out_ptr + b, tl.where(tok != pad, tl.sum(acc, axis=0), 0.0))

    @triton.jit
    def _embedding_ghost_kernel(
        tok_ptr,
        g_ptr,
        pairs_ptr,
        out_ptr,
        T,
        p,
        n_pairs,
        pad,
        stb,
        stt,
        sgb,
        sgt,
        sgp,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # one program per (example, tile pair), on a 1-D grid (the 2nd and 3rd grid axes stop at 65535)
        pid = tl.program_id(0).to(tl.int64)
        b = pid // n_pairs
        pair = pid % n_pairs
        ti = tl.load(pairs_ptr + 2 * pair)
        si = tl.load(pairs_ptr + 2 * pair + 1)
        rows_t = ti * BLOCK_T + tl.arange(0, BLOCK_T)
        rows_s = si * BLOCK_T + tl.arange(0, BLOCK_T)
        rt = rows_t.to(tl.int64)
        rs = rows_s.to(tl.int64)
        # pad is -1 without padding: never a token id
        tok_t = tl.load(tok_ptr + b * stb + rt * stt, mask=rows_t < T, other=pad)
        tok_s = tl.load(tok_ptr + b * stb + rs * stt, mask=rows_s < T, other=pad)
        keep_t = (rows_t < T) & (tok_t != pad)
        keep_s = (rows_s < T) & (tok_s != pad)
        same = (tok_t[:, None] == tok_s[None, :]) & keep_t[:, None] & keep_s[None, :]
        # a tile pair without a matching (t, s) contributes nothing: its dot loop runs 0 times
        n_same = tl.sum(tl.sum(same.to(tl.int32), axis=1), axis=0)
        p_used = tl.where(n_same > 0, p, 0)
        gram = gram_tile(g_ptr + b * sgb, rt, rs, keep_t, keep_s, p_used, sgt, sgp, IEEE, UPCAST, BLOCK_T, BLOCK_K)
        weight = tl.where(ti == si, 1.0, 2.0)
        total = tl.sum(tl.sum(tl.where(same, gram, 0.0), axis=1), axis=0)
        tl.store(out_ptr + pid, weight * total)

    # the reduction block autotuned per shape on a GPU; every config writes every (example, pair) slot
    _ghost_launch = TunedLaunch(
        _embedding_ghost_kernel,
        configs(*[({"BLOCK_K": k}, w, 3) for k in (32, 64, 128) for w in (4, 8)]),
        key=["T", "p"],
    )


def embedding_sq_norms_triton(tokens: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Triton kernels (tokens (B, T), g (B, T, p), any strides; padding_idx -1 for none) → float32 (B,)."""
    B, T, p = g.shape
    if T == 0:
        return torch.zeros(B, dtype=torch.float32, device=g.device)
    if T == 1:
        out = torch.empty(B, dtype=torch.float32, device=g.device)
        _embedding_rowwise_kernel[(B,)](
            tokens,
            g,
            out,
            p,
            padding_idx,
            tokens.stride(0),
            g.stride(0),
            g.stride(2),
            BLOCK=256,
        )
        return out
    block_t = ghost_block_t(T)
    pairs = upper_triangle_pairs(triton.cdiv(T, block_t), g.device)
    n_pairs = pairs.shape[0]
    out = torch.empty((B, n_pairs), dtype=torch.float32, device=g.device)
    args = (
        tokens,
        g,
        pairs,
        out,
        T,
        p,
        n_pairs,
        padding_idx,
        tokens.stride(0),
        tokens.stride(1),
        g.stride(0),
        g.stride(1),
        g.stride(2),
    )
    _ghost_launch((B * n_pairs,), args, dict(**dot_flags(g.dtype), BLOCK_T=block_t), fixed=dict(BLOCK_K=64))
    return out.sum(dim=1)


def embedding_clipped_grad_triton(
    tokens: torch.Tensor,
    g: torch.Tensor,
    clip_factors: torch.Tensor,
    num_embeddings: int,
    padding_idx: int,
    noise_std: float,
    key: PhiloxKey,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The deterministic clipped row sum, then the noise added in place by the Triton kernel."""
    acc = _clipped_row_sum(tokens, g, clip_factors, num_embeddings, padding_idx)
    add_noise_triton_(acc, noise_std, key)
    return acc.to(out_dtype or g.dtype)


# ---------------------------------------------------------------- the ops -----------------


def _embedding_sq_norms_triton(
    tokens: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int
) -> torch.Tensor:
    return embedding_sq_norms_triton(tokens, g, padding_idx)


def _sq_norms_fake(tokens: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int) -> torch.Tensor:
    return g.new_empty(g.shape[0], dtype=torch.float32)


def _per_example_fake(tokens: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int) -> torch.Tensor:
    return g.new_empty((g.shape[0], num_embeddings, g.shape[2]), dtype=torch.float32)


def _clipped_grad_fake(
    tokens: torch.Tensor,
    g: torch.Tensor,
    clip_factors: torch.Tensor,
    num_embeddings: int,
    padding_idx: int,
    noise_std: float,
    key: torch.Tensor,
    out_dtype: Optional[torch.dtype],
) -> torch.Tensor:
    return g.new_empty((num_embeddings, g.shape[2]), dtype=out_dtype or g.dtype)


# dpkernels::embedding_* (ops/_library.py): tokens (B, T), G (B, T, p); padding_idx -1 for none
SQ_NORMS = kernel_op(
    "embedding_sq_norms",
    "(Tensor tokens, Tensor grad_output, int num_embeddings, int padding_idx) -> Tensor",
    torch=embedding_sq_norms_reference,
    triton=_embedding_sq_norms_triton,
    fake=_sq_norms_fake,
)
PER_EXAMPLE_GRADS = kernel_op(
    "embedding_per_example_grads",
    "(Tensor tokens, Tensor grad_output, int num_embeddings, int padding_idx) -> Tensor",
    torch=embedding_per_example_grads_reference,
    fake=_per_example_fake,
)
CLIPPED_GRAD = kernel_op(
    "embedding_clipped_grad",
    "(Tensor tokens, Tensor grad_output, Tensor clip_factors, int num_embeddings, int padding_idx, float noise_std, "
    "Tensor key, ScalarType? out_dtype) -> Tensor",
    torch=embedding_clipped_grad_reference,
    triton=embedding_clipped_grad_triton,
    fake=_clipped_grad_fake,
    key_args=(6,),
)
