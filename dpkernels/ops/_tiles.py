"""Tiling of the T×T plane that the ghost kernels share (linear layers, embeddings).

The ghost norms are sums over all (t, s) position pairs of one example; the kernels cut the T×T
plane into square tiles of edge ``ghost_block_t(T)`` and, the plane being symmetric, visit only
the tiles on and above the diagonal (``upper_triangle_pairs``), counting off-diagonal tiles
twice. ``gram_tile`` forms one tile of a Gram matrix A Aᵀ in registers.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton


def ghost_block_t(T: int) -> int:
    """The ghost kernel's tile edge on the T×T plane."""
    return 64 if T > 32 else (32 if T > 16 else 16)


_PAIRS_CACHE: dict = {}


def upper_triangle_pairs(n_tiles: int, device: torch.device) -> torch.Tensor:
    """(n(n+1)/2, 2) int32 tile coordinates (i, j), i <= j, of an n × n tiling, cached per device."""
    key = (n_tiles, str(device))
    pairs = _PAIRS_CACHE.get(key)
    if pairs is None:
        idx = torch.triu_indices(n_tiles, n_tiles)
        pairs = idx.t().contiguous().to(device=device, dtype=torch.int32)
        _PAIRS_CACHE[key] = pairs
    return pairs


if HAS_TRITON:
    from ._triton import dot_acc

    @triton.jit
    def gram_tile(
        base,
        rt,
        rs,
        mask_t,
        mask_s,
        n_cols,
        s_row,
        s_col,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """(A A^T) restricted to rows rt × rows rs, for one example's matrix A at ``base``: float32."""
        offs_k = tl.arange(0, BLOCK_K)
        gram = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        for k in range(0, n_cols, BLOCK_K):
            cols = k + offs_k
            cmask = cols < n_cols
            c64 = cols.to(tl.int64)
            a = tl.load(
                base + rt[:, None] * s_row + c64[None, :] * s_col, mask=mask_t[:, None] & cmask[None, :], other=0.0
            )
            a2 = tl.load(
                base + rs[:, None] * s_row + c64[None, :] * s_col, mask=mask_s[:, None] & cmask[None, :], other=0.0
            )
            gram = dot_acc(gram, a, tl.trans(a2), IEEE, UPCAST)
        return gram
