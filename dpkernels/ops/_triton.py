"""Whether Triton can run here, and the Triton helpers every kernel shares: Philox noise (in
kernels and on its own), float32-accumulating dots, autotuning candidates and the one launcher
(``TunedLaunch``) that chooses between autotuned and fixed meta-parameters.

Importing this module never fails: without triton, ``HAS_TRITON`` is False and the kernels
modules are not imported by the dispatcher.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on the CPU with CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAS_TRITON:

    @triton.jit
    def philox4x32_10_tl(group, seed_lo, seed_hi, step, stream):
        """Philox-4x32-10 of counters (group lo, group hi, step, stream); group: int64 tensor."""
        c0 = (group & 0xFFFFFFFF).to(tl.uint32)
        c1 = ((group >> 32) & 0xFFFFFFFF).to(tl.uint32)
        # broadcast first, then convert: a scalar argument may be an int32/int64 tensor or, where
        # Triton specialised it, a constexpr (and tl.to_tensor is missing from older Triton)
        zero = tl.zeros_like(c0)
        c2 = (zero + step).to(tl.uint32)
        c3 = (zero + stream).to(tl.uint32)
        k0 = (zero + seed_lo).to(tl.uint32)
        k1 = (zero + seed_hi).to(tl.uint32)
        m0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
        m1 = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
        for _ in tl.static_range(10):
            hi0 = tl.umulhi(m0, c0)
            lo0 = m0 * c0
            hi1 = tl.umulhi(m1, c2)
            lo1 = m1 * c2
            c0 = hi1 ^ c1 ^ k0
            c1 = lo1
            c2 = hi0 ^ c3 ^ k1
            c3 = lo0
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def _radius(x_hi, x_lo):
        """sqrt(-2 ln u), u = x_hi·2^-32 + (x_lo·2^-64 + 2^-65): the 64-bit uniform of ops/philox.py."""
        u = x_hi.to(tl.float32) * 2.3283064365386963e-10 + (
            x_lo.to(tl.float32) * 5.421010862427522e-20 + 2.710505431213761e-20
        )
        return tl.sqrt(-2.0 * tl.log(u))

    @triton.jit
    def _angle(x):
        return 6.283185307179586 * (x.to(tl.float32) * 2.3283064365386963e-10)

    @triton.jit
    def philox_normal_tl(elem, seed_lo, seed_hi, step, stream):
        """Standard normals for int64 element indices ``elem`` of any shape and alignment.

        One Philox call per element (the other element of its pair is discarded); use
        ``philox_normal_pairs_tl`` where elements come in aligned pairs.
        """
        x0, x1, x2, _ = philox4x32_10_tl(elem >> 1, seed_lo, seed_hi, step, stream)
        radius = _radius(x0, x1)
        angle = _angle(x2)
        return radius * tl.where((elem & 1) == 1, tl.sin(angle), tl.cos(angle))

    @triton.jit
    def philox_normal_pairs_tl(pair, seed_lo, seed_hi, step, stream):
        """The normals of elements 2q, 2q+1 for int64 pair indices ``pair`` of shape (R, Q): (R, 2Q).

        One Philox call, one log and one square root per two elements.
        """
        x0, x1, x2, _ = philox4x32_10_tl(pair, seed_lo, seed_hi, step, stream)
        radius = _radius(x0, x1)
        angle = _angle(x2)
        # join(a, b)[..., q, o] is z_{2q+o}: row-major order z0 z1
        z = tl.join(radius * tl.cos(angle), radius * tl.sin(angle))
        return tl.reshape(z, (pair.shape[0], 2 * pair.shape[1]))

    @triton.jit
    def dot_acc(acc, a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b with float32 accumulation.

        IEEE: float32 operands multiplied exactly (no TF32). UPCAST: operands converted to
        float32 first — set only under TRITON_INTERPRET=1, whose tl.dot mishandles bfloat16.
        """
        if UPCAST:
            return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            return acc + tl.dot(a, b, input_precision="ieee")
        else:
            return acc + tl.dot(a, b)

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "stream"])
    def _philox_normal_kernel(out, n, seed_lo, seed_hi, step, stream, BLOCK: tl.constexpr):
        pairs = tl.program_id(0).to(tl.int64) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
        z = tl.reshape(philox_normal_pairs_tl(pairs[None, :], seed_lo, seed_hi, step, stream), (BLOCK,))
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + offs, z, mask=offs < n)

    @triton.jit(do_not_specialize=["offset", "seed_lo", "seed_hi", "step", "stream"])
    def _philox_normal_offset_kernel(out, n, offset, seed_lo, seed_hi, step, stream, BLOCK: tl.constexpr):
        # out[i] = z_{offset + i}: elements of any alignment, one Philox call each
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        z = philox_normal_tl(offs + offset, seed_lo, seed_hi, step, stream)
        tl.store(out + offs, z, mask=offs < n)

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "stream"])
    def _philox_add_noise_kernel(out_ptr, n, noise_std, seed_lo, seed_hi, step, stream, BLOCK: tl.constexpr):
        # out (contiguous float32, n elements) += noise_std · z_e, e = flat index (pairs 2q, 2q+1)
        pid = tl.program_id(0).to(tl.int64)
        pairs = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
        z = tl.reshape(philox_normal_pairs_tl(pairs[None, :], seed_lo, seed_hi, step, stream), (BLOCK,))
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.load(out_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc + noise_std * z, mask=mask)


def use_autotune() -> bool:
    """Autotune block sizes on a GPU; under the interpreter, or with DPKERNELS_AUTOTUNE=0, use the
    fixed small blocks (one compile per kernel variant: what a GPU test run wants)."""
    return HAS_TRITON and not interpret_mode() and os.environ.get("DPKERNELS_AUTOTUNE", "1") != "0"


def configs(*specs: tuple) -> list:
    """triton.Config list from (meta-parameter dict, num_warps, num_stages) tuples."""
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in specs]


# (BLOCK_rows, BLOCK_cols, BLOCK_reduction, num_warps, num_stages) of the GEMM-shaped kernels.
# The last two are for float32 (IEEE products on FMA units): every larger tile spills there
# (bench/kernel_resources.py reads registers and spills of each candidate without a GPU).
_GEMM_TILES = (
    (64, 64, 32, 4, 3),
    (64, 64, 64, 4, 4),
    (128, 64, 32, 4, 3),
    (64, 128, 32, 4, 3),
    (128, 64, 64, 8, 4),
    (64, 128, 64, 8, 4),
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3),
    (64, 64, 16, 8, 2),
    (32, 64, 32, 4, 3),
)


def gemm_tile_configs(rows: str, cols: str, reduction: str) -> list:
    """Autotuning candidates for a kernel with an output tile (rows × cols) reduced over ``reduction``."""
    return configs(*[({rows: r, cols: c, reduction: k}, w, s) for r, c, k, w, s in _GEMM_TILES])


class TunedLaunch:
    """One Triton kernel, launched the one way this machine wants: with meta-parameters autotuned
    per shape over ``configs`` on a GPU, or with the fixed ones the caller passes under the
    interpreter or DPKERNELS_AUTOTUNE=0 (one compile per kernel variant). The only place that
    makes this choice.

    ``reset_to_zero`` names output arguments that hold partial sums in tile-indexed slots: a
    tiling writes only its own slots, so the autotuner zeroes them before timing each candidate
    and again before the chosen one runs (Triton's own ``reset_to_zero``), and no losing tiling
    leaves stale sums behind. The caller allocates them zeroed for the runs that do not tune."""

    def __init__(self, kernel, configs: list, key: list, reset_to_zero: "list | None" = None) -> None:
        self.kernel = kernel
        self.tuned = triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero)(kernel)

    def __call__(self, grid, args: tuple, flags: dict, fixed: dict) -> None:
        """``grid``: a tuple, or a function of the meta-parameters; ``fixed``: the meta-parameters
        used when not autotuning."""
        if use_autotune():
            self.tuned[grid](*args, **flags)
        else:
            self.kernel[grid(fixed) if callable(grid) else grid](*args, **flags, **fixed)


def dot_flags(dtype: torch.dtype) -> dict:
    """The IEEE / UPCAST constexpr flags of ``dot_acc`` for operands of ``dtype``."""
    return {"IEEE": dtype == torch.float32, "UPCAST": interpret_mode() and dtype != torch.float32}


def philox_normal_triton(numel: int, key, device, offset: int = 0) -> torch.Tensor:
    """The Triton generator alone (noise without a sum): same values as ops.philox.philox_normal,
    elements offset .. offset + numel − 1 of the key's draw (offset 0: one Philox call per pair of
    elements; otherwise one per element, any alignment)."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return out
    block = 1024
    if offset == 0:
        _philox_normal_kernel[(triton.cdiv(numel, block),)](
            out, numel, key.seed_lo, key.seed_hi, key.step, key.stream, BLOCK=block
        )
    else:
        _philox_normal_offset_kernel[(triton.cdiv(numel, block),)](
            out, numel, offset, key.seed_lo, key.seed_hi, key.step, key.stream, BLOCK=block
        )
    return out


def add_noise_triton_(out: torch.Tensor, noise_std: float, key) -> torch.Tensor:
    """out += noise_std·z in place (out contiguous float32; z = philox_normal(out.numel(), key))."""
    if not (out.dtype == torch.float32 and out.is_contiguous()):
        raise ValueError("add_noise_triton_ needs a contiguous float32 tensor")
    n = out.numel()
    if n == 0 or noise_std == 0.0:
        return out
    block = 1024
    _philox_add_noise_kernel[(triton.cdiv(n, block),)](
        out,
        n,
        float(noise_std),
        key.seed_lo,
        key.seed_hi,
        key.step,
        key.stream,
        BLOCK=block,
    )
    return out
