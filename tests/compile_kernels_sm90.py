"""Compile every Triton kernel of dpkernels for Hopper (sm_90) ahead of time — no GPU needed.

Run by tests/test_triton_compile.py in a subprocess without TRITON_INTERPRET (the interpreter
replaces kernels by Python functions). Catches what the interpreter does not check: types that
do not lower, tl.dot shape rules, register/shared-memory layouts. Prints one line per kernel.
"""

from __future__ import annotations

import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dpkernels.ops import _triton as kt  # noqa: E402
from dpkernels.ops import clip_sum_noise as csn  # noqa: E402
from dpkernels.ops import conv_sq_norms as cvn  # noqa: E402
from dpkernels.ops import embedding_grads as emb  # noqa: E402
from dpkernels.ops import linear_clipped_grad as lcg  # noqa: E402
from dpkernels.ops import linear_sq_norms as lsn  # noqa: E402
from dpkernels.ops import norm_affine_grads as nag  # noqa: E402
from dpkernels.ops import tied_cross as tc  # noqa: E402

TARGET = GPUTarget("cuda", 90, 64)
FLOAT_ARGS = {"noise_std"}
I64_ARGS = {"seed_lo", "seed_hi"}


def signature(fn, data_ptrs: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in data_ptrs:
            sig[name] = data_ptrs[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in I64_ARGS:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def compile_one(label: str, fn, data_ptrs: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> None:
    src = ASTSource(
        fn=fn,
        signature=signature(fn, data_ptrs, constexprs),
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
    )
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    uses_tc = "wgmma" in compiled.asm["ptx"] or "mma" in compiled.asm["ptx"]
    print(f"ok {label} (cubin {len(compiled.asm['cubin'])} bytes, tensor cores: {uses_tc})")


def main() -> int:
    failures = 0
    for dt in ("bf16", "fp16", "fp32"):
        flags = {"IEEE": dt == "fp32", "UPCAST": False}
        xg = {"x_ptr": f"*{dt}", "g_ptr": f"*{dt}"}
        jobs = [
            ("rowwise " + dt, lsn._linear_rowwise_kernel, xg, {"HAS_BIAS": True, "BLOCK": 256}, 4, 1),
            (
                "ghost " + dt,
                lsn._linear_ghost_kernel,
                {**xg, "pairs_ptr": "*i32"},
                {"HAS_BIAS": True, **flags, "BLOCK_T": 64, "BLOCK_K": 64},
                8,
                3,
            ),
            (
                "direct " + dt,
                lsn._linear_direct_kernel,
                xg,
                {"HAS_BIAS": True, **flags, "BLOCK_P": 128, "BLOCK_D": 128, "BLOCK_T": 64},
                8,
                3,
            ),
            (
                "clipped_grad " + dt,
                lcg._linear_clipped_grad_kernel,
                {**xg, "out_ptr": f"*{dt}"},
                {"HAS_NOISE": True, "ALIGNED2": dt != "fp16", **flags, "BLOCK_P": 128, "BLOCK_D": 128, "BLOCK_K": 64},
                8,
                3,
            ),
            (
                "clip_sum_noise " + dt,
                csn._clip_sum_noise_kernel,
                {"g_ptr": f"*{dt}", "out_ptr": f"*{dt}"},
                {"HAS_NOISE": True, "BLOCK_B": 16, "BLOCK_N": 256},
                4,
                2,
            ),
            (
                "conv_direct " + dt,
                cvn._conv_direct_kernel,
                xg,
                {"KH": 3, "KW": 3, **flags, "BLOCK_P": 64, "BLOCK_D": 64, "BLOCK_L": 32},
                4,
                3,
            ),
            (
                "norm_affine_grads " + dt,
                nag._norm_affine_grads_kernel,
                xg,
                {"HAS_MEAN": True, "WANT_W": True, "WANT_B": True, "BLOCK_R": 32, "BLOCK_N": 128},
                4,
                2,
            ),
            (
                "embedding_rowwise " + dt,
                emb._embedding_rowwise_kernel,
                {"tok_ptr": "*i64", "g_ptr": f"*{dt}"},
                {"BLOCK": 256},
                4,
                1,
            ),
            (
                "embedding_ghost " + dt,
                emb._embedding_ghost_kernel,
                {"tok_ptr": "*i32" if dt == "fp16" else "*i64", "g_ptr": f"*{dt}", "pairs_ptr": "*i32"},
                {**flags, "BLOCK_T": 64, "BLOCK_K": 64},
                8,
                3,
            ),
            (
                "tied_token_linear_cross " + dt,
                tc._token_linear_cross_kernel,
                {"tok_ptr": "*i64", "ge_ptr": f"*{dt}", "x_ptr": f"*{dt}", "gh_ptr": f"*{dt}"},
                {**flags, "BLOCK_S": 32, "BLOCK_T": 32, "BLOCK_K": 32},
                4,
                2,
            ),
        ]
        if dt == "fp32":
            jobs.append(("philox_normal", kt._philox_normal_kernel, {"out": "*fp32"}, {"BLOCK": 1024}, 4, 1))
            jobs.append(
                (
                    "philox_normal_offset",
                    kt._philox_normal_offset_kernel,
                    {"out": "*fp32", "offset": "i64"},
                    {"BLOCK": 1024},
                    4,
                    1,
                )
            )
            jobs.append(("philox_add_noise", kt._philox_add_noise_kernel, {}, {"BLOCK": 1024}, 4, 1))
        for label, fn, ptrs, consts, warps, stages in jobs:
            try:
                compile_one(label, fn, ptrs, consts, warps, stages)
            except Exception as e:  # report every failure, not just the first
                failures += 1
                print(f"FAILED {label}: {type(e).__name__}: {str(e)[:2000]}")
                traceback.print_exc()  # the compiler's own message (an MLIR pass, a lowering) is in the chain
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
