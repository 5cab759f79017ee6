"""A tied input/output embedding: what its cross term costs, kernel and whole step.

1. The cross term ⟨g_i^emb, g_i^head⟩ (``functional.embedding_linear_cross``: Triton on CUDA
   tensors, the torch reference on the CPU) against what the head costs a non-private step
   anyway, its weight-gradient GEMM Hᵀx over the B·T rows, at GPT-2-small's shape (B=32, T=256,
   d=768, vocabulary 50257). Floors: the cross term 2·B·T²·d multiply-adds plus a gather of B·T²
   entries of H; the GEMM 2·B·T·d·V.
2. The private step of the GPT of bench_step with its head tied to the token embedding against
   the same GPT untied (all parameters trained both times), each as a ratio to its non-private
   step, by bench_step's own builders. A GPU runs GPT-2-small's shape; the CPU (the default when no
   GPU is there) a reduced one that says what it is, since one step of the full shape takes minutes
   on two cores.

    python bench/bench_tied.py                 # writes bench/results/tied-<device>-<date>.{md,json}
    python bench/bench_tied.py --smoke         # tiny shapes, /tmp
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_step, common, models  # noqa: E402
from dpkernels import functional  # noqa: E402

KERNEL_SHAPES = {"full": dict(B=32, T=256, d=768, V=50257), "smoke": dict(B=2, T=9, d=16, V=37)}
STEP_SHAPES = {
    "gpu": dict(),  # GPT-2 small as bench_step has it
    "cpu": dict(seq=64, batch=4),  # GPT-2 small's widths, vocabulary and depth; a shorter, smaller batch
    "smoke": dict(vocab=97, seq=8, d_model=32, n_layer=2, n_head=2, d_mlp=64, batch=4),
}


def kernel_rows(shape: Dict[str, int], device: torch.device, dtype: torch.dtype, seed: int) -> Dict[str, Any]:
    B, T, d, V = shape["B"], shape["T"], shape["d"], shape["V"]
    gen = common.generator(device, seed)
    tok = torch.randint(0, V, (B, T), generator=gen, device=device)
    ge = common.randn((B, T, d), dtype=dtype, device=device, gen=gen)
    x = common.randn((B, T, d), dtype=dtype, device=device, gen=gen)
    gh = common.randn((B, T, V), dtype=dtype, device=device, gen=gen)
    cross = common.time_fn(
        lambda: functional.embedding_linear_cross(tok, ge, x, gh), device, warmup=2, min_reps=5, max_reps=50
    )
    gemm = common.time_fn(lambda: gh.reshape(-1, V).t() @ x.reshape(-1, d), device, warmup=2, min_reps=5, max_reps=50)
    return {
        "shape": shape,
        "dtype": common.dtype_name(dtype),
        "cross_ms": cross.ms,
        "gemm_ms": gemm.ms,
        "ratio": cross.ms / gemm.ms,
        "cross_floor_gflop": 2 * B * T * T * d / 1e9,
        "gemm_floor_gflop": 2 * B * T * d * V / 1e9,
        "backend": "triton" if device.type == "cuda" else "torch",
    }


def step_rows(cfg_kw: Dict[str, Any], device: torch.device, args: argparse.Namespace) -> List[Dict[str, Any]]:
    step_args = argparse.Namespace(
        seed=args.seed,
        optimizer="sgd",
        sigma=1.0,
        max_grad_norm=1.0,
        norm_method="auto",
        clipping="flat",
        dp_backend=args.dp_backend,
        steps=args.steps,
        warmup=args.warmup,
        check=args.check,
        modes=["non_private", "dpkernels"],
    )
    out = []
    for name, tied in (("gpt_untied", False), ("gpt_tied", True)):
        cfg = models.GPTConfig(train_all=True, tied=tied, **cfg_kw)
        out.append(bench_step.run_workload(name, "gpt", cfg, "float32", device, step_args))
    return out


def render(kernel: List[Dict[str, Any]], steps: List[Dict[str, Any]], label: str) -> str:
    parts = [
        "## Cross term vs the head's weight-gradient GEMM\n",
        common.md_table(
            ["B, T, d, V", "dtype", "backend", "cross term ms", "head GEMM ms", "cross / GEMM", "floors (GFLOP)"],
            [
                [
                    ", ".join(str(r["shape"][k]) for k in "BTdV"),
                    r["dtype"],
                    r["backend"],
                    r["cross_ms"],
                    r["gemm_ms"],
                    r["ratio"],
                    f"{r['cross_floor_gflop']:.3g} / {r['gemm_floor_gflop']:.3g}",
                ]
                for r in kernel
            ],
        ),
        f"\n## Private step, tied vs untied head ({label})\n",
    ]
    rows = []
    for res in steps:
        modes = {m["mode"]: m for m in res["modes"]}
        dp = modes.get("dpkernels", {})
        err = dp.get("grad_rel_err_vs_loop")
        rows.append(
            [
                res["workload"],
                res["describe"],
                modes.get("non_private", {}).get("median_ms"),
                dp.get("median_ms"),
                dp.get("time_ratio"),
                f"{err:.1e}" if isinstance(err, float) else "–",
                dp.get("status"),
            ]
        )
    parts.append(
        common.md_table(
            [
                "workload",
                "model",
                "non-private ms",
                "dpkernels ms",
                "dpkernels / non-private",
                "grad err vs loop",
                "status",
            ],
            rows,
        )
    )
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--dp-backend", default=None)
    ap.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        default=True,
        help="skip the zero-noise gradient check against a per-example loop",
    )
    args = ap.parse_args(argv)
    # a CPU measurement too (the issue asks for one where no GPU is lent), labelled by its file name
    device = torch.device("cuda") if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    if args.smoke:
        kernel_shape, step_kw, label = KERNEL_SHAPES["smoke"], STEP_SHAPES["smoke"], "smoke shapes"
        args.dp_backend = args.dp_backend or common.smoke_dp_backend()
    elif device.type == "cuda":
        kernel_shape, step_kw, label = KERNEL_SHAPES["full"], STEP_SHAPES["gpu"], "GPT-2 small, B=32, T=256"
    else:
        kernel_shape, step_kw = KERNEL_SHAPES["full"], STEP_SHAPES["cpu"]
        label = "CPU: GPT-2 small's widths and vocabulary, B=4, T=64"
    args.steps = args.steps or (3 if args.smoke or device.type == "cpu" else 20)
    args.warmup = args.warmup or (1 if args.smoke or device.type == "cpu" else 5)
    tag = {"device_tag": "CPU"} if device.type == "cpu" and not args.smoke else {}
    env = common.env_record(device, script="bench_tied", smoke=args.smoke, **tag)
    print(f"# tied embedding on {env['device']} (commit {env['dpkernels_commit']})", flush=True)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    kernel = [kernel_rows(kernel_shape, device, dt, args.seed) for dt in dtypes]
    for r in kernel:
        print(f"  cross term {r['cross_ms']:.3f} ms, head GEMM {r['gemm_ms']:.3f} ms ({r['dtype']})", flush=True)
    common.release(device)
    steps = step_rows(step_kw, device, args)
    md = render(kernel, steps, label)
    paths = common.write_results(
        "tied",
        device,
        env,
        {"kernel": kernel, "steps": steps, "step_shape": label},
        md,
        args.out_dir,
        cpu_results=not args.smoke,
    )
    print("\n" + md, flush=True)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
