"""Registers and spills of every Triton kernel config, compiled for sm_90 — no GPU needed.

    python bench/kernel_resources.py            # every autotuning candidate, bf16 and fp32

Compiles each kernel ahead of time (as tests/compile_kernels_sm90.py does) and reads the cubin's
resource usage with the cuobjdump that ships inside triton. A config that spills (STACK > 0) will
rarely win the autotuner; this is a static view to read before measuring, not a timing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import compile_kernels_sm90 as ck  # noqa: E402
import triton  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dpkernels.ops import _triton as kt  # noqa: E402
from dpkernels.ops import linear_clipped_grad as lcg  # noqa: E402
from dpkernels.ops import linear_sq_norms as lsn  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resources(fn, ptrs: dict, consts: dict, warps: int, stages: int) -> str:
    src = ASTSource(
        fn=fn,
        signature=ck.signature(fn, ptrs, consts),
        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
    )
    compiled = triton.compile(src, target=ck.TARGET, options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK):(\d+)", out))
    return (
        f"regs {found.get('REG', '?'):>3}  spill {found.get('STACK', '?'):>4} B  smem {compiled.metadata.shared:>6} B"
    )


def main() -> None:
    for dt in ("bf16", "fp32"):
        flags = {"IEEE": dt == "fp32", "UPCAST": False}
        xg = {"x_ptr": f"*{dt}", "g_ptr": f"*{dt}"}
        for cfg in kt._GEMM_TILES:
            r, c, k, w, s = cfg
            print(
                f"{dt} direct       {r}x{c}x{k} w{w} s{s}: "
                + resources(
                    lsn._linear_direct_kernel,
                    xg,
                    {"HAS_BIAS": True, **flags, "BLOCK_P": r, "BLOCK_D": c, "BLOCK_T": k},
                    w,
                    s,
                )
            )
            print(
                f"{dt} clipped_grad {r}x{c}x{k} w{w} s{s}: "
                + resources(
                    lcg._linear_clipped_grad_kernel,
                    {**xg, "out_ptr": f"*{dt}"},
                    {"HAS_NOISE": True, "ALIGNED2": True, **flags, "BLOCK_P": r, "BLOCK_D": c, "BLOCK_K": k},
                    w,
                    s,
                )
            )
        for k in (32, 64, 128):
            for w in (4, 8):
                print(
                    f"{dt} ghost        64x64 K{k} w{w} s3: "
                    + resources(
                        lsn._linear_ghost_kernel,
                        {**xg, "pairs_ptr": "*i32"},
                        {"HAS_BIAS": True, **flags, "BLOCK_T": 64, "BLOCK_K": k},
                        w,
                        3,
                    )
                )


if __name__ == "__main__":
    main()
