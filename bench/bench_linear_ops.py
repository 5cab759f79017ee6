"""Micro-benchmark of the linear-layer kernels against the plain weight-gradient GEMM.

For each (B, T, d, p) and dtype, with x (B, T, d) and G (B, T, p) random:

    gemm          G.reshape(-1, p).T @ x.reshape(-1, d)       what non-private backward does
    norms auto / ghost / direct
                  dpkernels.functional.linear_sq_norms(method=..., backend="triton")
    torch ghost / torch per-example
                  the torch references (backend="torch"): they materialise the (B, T, T)
                  Gram matrices / the (B, p, d) per-example gradients, as a naive or
                  Opacus-style implementation does
    clipped grad  dpkernels.functional.linear_clipped_grad(noise_std=1.0, backend="triton")

Reported: median time, ratio to the GEMM, achieved TFLOP/s, peak extra memory (peak allocated
during one call minus what was allocated before it: the inputs), and each shape's floor: the
fused norm costs at least min(T(d+p)/(dp), 1) of the GEMM's arithmetic (ghost ≈ B·T²·(d+p)
multiply-adds counting each symmetric pair once, i.e. 2BT²(d+p)/2 FLOPs; direct 2BTdp, the
GEMM's own count), and for T = 1 the norm is memory-bound (one read of x and G).

The norms are computed without the bias term (``bias=False``, ``--bias`` to include it), so
that every row does the weight-gradient work the GEMM does and nothing else.

    python bench/bench_linear_ops.py                 # GPU: the issue's shapes, fp32 and bf16
    TRITON_INTERPRET=1 python bench/bench_linear_ops.py --smoke    # CPU check of the script
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.common import fmt_bytes, md_table  # noqa: E402

SHAPES = [
    (32, 256, 768, 768),
    (32, 256, 768, 3072),
    (32, 1024, 768, 2304),
    (16, 2048, 4096, 4096),
    (256, 1, 1024, 1024),
]
SMOKE_SHAPES = [(2, 16, 32, 48), (2, 40, 24, 16), (8, 1, 32, 32)]
DTYPES = ["float32", "bfloat16"]

OPS = ["gemm", "norms_auto", "norms_ghost", "norms_direct", "torch_ghost", "torch_per_example", "clipped_grad"]
LABELS = {
    "gemm": "weight-grad GEMM (torch)",
    "norms_auto": "fused norms, auto",
    "norms_ghost": "fused norms, ghost",
    "norms_direct": "fused norms, direct",
    "torch_ghost": "torch ghost reference (stores B·T² Grams)",
    "torch_per_example": "torch per-example reference (stores B·p·d)",
    "clipped_grad": "fused clip-accumulate-noise",
}


# ------------------------------------------------------------------ arithmetic --------------


def choose_method(T: int, d: int, p: int) -> str:
    """dpkernels' own choice for ``method="auto"`` (imported late: dpkernels must be imported after
    TRITON_INTERPRET is settled, which a --smoke run may do)."""
    from dpkernels.ops.linear_sq_norms import choose_method as dpkernels_choice

    return dpkernels_choice(T, d, p)


def flops(op: str, B: int, T: int, d: int, p: int, method: Optional[str] = None) -> float:
    """Useful FLOPs of each op (a multiply-add counts 2)."""
    gemm = 2.0 * B * T * d * p
    if op in ("gemm", "clipped_grad", "torch_per_example"):
        return gemm
    if op == "torch_ghost":
        return 2.0 * B * T * T * (d + p) if T > 1 else 2.0 * B * (d + p)
    m = method or op.split("_", 1)[1]
    if T == 1 or m == "rowwise":
        return 2.0 * B * (d + p)
    if m == "ghost":
        return 1.0 * B * T * T * (d + p)  # 2BT²(d+p) halved by symmetry
    if m == "direct":
        return gemm
    raise ValueError(m)


def floor_ratio(T: int, d: int, p: int) -> float:
    """Arithmetic floor of a fused norm relative to the weight-grad GEMM."""
    return min(T * (d + p) / (d * p), 1.0)


def io_bytes(B: int, T: int, d: int, p: int, elem: int) -> Dict[str, float]:
    return {"inputs": float(B * T * (d + p) * elem), "grad_weight": float(d * p * elem)}


def estimate_extra(op: str, B: int, T: int, d: int, p: int, elem: int) -> float:
    """Upper estimate of the extra memory of the reference paths (bytes), for skipping."""
    upcast = B * T * (d + p) * 4 if elem != 4 else 0
    if op == "torch_ghost":
        return upcast + 3.0 * B * T * T * 4
    if op == "torch_per_example":
        return upcast + 2.0 * B * p * d * 4
    if op in ("gemm", "clipped_grad"):
        return 2.0 * d * p * 4
    return 64.0 * B * 1024  # norms: (B, tiles) partial sums


# ------------------------------------------------------------------ ceilings ---------------


def measure_ceilings(device: torch.device, dtypes: List[torch.dtype], smoke: bool) -> Dict[str, Any]:
    """Copy bandwidth (bytes read + written) and a large square GEMM's rate per dtype."""
    out: Dict[str, Any] = {}

    def copy_rate() -> float:
        n = (1 << 16) if smoke else (1 << 28)  # 1 GiB of fp32
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        t = common.time_fn(lambda: dst.copy_(src), device, warmup=3, min_reps=10, max_reps=50, flush_l2=False)
        return 2 * n * 4 / (t.ms * 1e-3) / 1e9

    def gemm_rate(dt: torch.dtype) -> float:
        m = 256 if smoke else 8192
        gen = common.generator(device, 1234)
        a = common.randn((m, m), dtype=dt, device=device, gen=gen)
        b = common.randn((m, m), dtype=dt, device=device, gen=gen)
        t = common.time_fn(lambda: a @ b, device, warmup=3, min_reps=5, max_reps=20, flush_l2=False)
        return 2.0 * m**3 / (t.ms * 1e-3) / 1e12

    out["copy_GBps"] = copy_rate()
    for dt in dtypes:
        out[f"gemm_TFLOPs_{common.dtype_name(dt)}"] = gemm_rate(dt)
    common.release(device)
    return out


# ------------------------------------------------------------------ one configuration ------


def run_config(
    shape, dtype: torch.dtype, device: torch.device, args, backend: str, ceilings: Dict[str, Any]
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    from dpkernels import functional
    from dpkernels.ops import linear_sq_norms as lsn
    from dpkernels.ops.philox import PhiloxKey

    B, T, d, p = shape
    elem = torch.finfo(dtype).bits // 8
    gen = common.generator(device, args.seed + hash(shape) % 1000)
    need = 2 * B * T * (d + p) * elem
    free = common.free_bytes(device)
    summary: Dict[str, Any] = {
        "B": B,
        "T": T,
        "d": d,
        "p": p,
        "dtype": common.dtype_name(dtype),
        "auto_method": choose_method(T, d, p),
        "floor_ratio": floor_ratio(T, d, p),
        "gemm_flops": flops("gemm", B, T, d, p),
        "ghost_flops": flops("norms_ghost", B, T, d, p),
        "direct_flops": flops("norms_direct", B, T, d, p),
        **{f"bytes_{k}": v for k, v in io_bytes(B, T, d, p, elem).items()},
    }
    bw = ceilings.get("copy_GBps")
    if bw:
        summary["norm_memory_floor_ms"] = summary["bytes_inputs"] / (bw * 1e9) * 1e3
    rows: List[Dict[str, Any]] = []
    if free is not None and need > 0.8 * free:
        summary["skipped"] = f"inputs need {fmt_bytes(need)}, {fmt_bytes(free)} free"
        print(f"  skip {shape} {summary['dtype']}: {summary['skipped']}", flush=True)
        return summary, rows

    x = common.randn((B, T, d), dtype=dtype, device=device, gen=gen)
    G = common.randn((B, T, p), dtype=dtype, device=device, gen=gen, scale=1e-2)
    c = torch.rand(B, generator=gen, device=device, dtype=torch.float32) * 0.9 + 0.1
    key = PhiloxKey(seed=args.seed + 1, step=0, stream=0)
    x2, G2 = x.reshape(-1, d), G.reshape(-1, p)
    x3, G3 = x, G
    bias = args.bias

    def torch_ref(method: str) -> Callable[[], torch.Tensor]:
        if T > 1:
            return lambda: functional.linear_sq_norms(x, G, bias=bias, method=method, backend="torch")
        # T = 1: functional picks the rowwise formula for any method; call the reference itself so
        # that the per-example path really materialises (B, p, d), as Opacus does
        return lambda: lsn.linear_sq_norms_reference(x3, G3, bias, method)

    fns: Dict[str, Callable[[], Any]] = {
        "gemm": lambda: G2.t() @ x2,
        "norms_auto": lambda: functional.linear_sq_norms(x, G, bias=bias, method="auto", backend=backend),
        "norms_ghost": lambda: functional.linear_sq_norms(x, G, bias=bias, method="ghost", backend=backend),
        "norms_direct": lambda: functional.linear_sq_norms(x, G, bias=bias, method="direct", backend=backend),
        "torch_ghost": torch_ref("ghost"),
        "torch_per_example": torch_ref("direct"),
        "clipped_grad": lambda: functional.linear_clipped_grad(
            x, G, c, bias=bias, noise_std=1.0, generator=key, backend=backend
        ),
    }
    methods = {
        "norms_auto": choose_method(T, d, p),
        "norms_ghost": "ghost" if T > 1 else "rowwise",
        "norms_direct": "direct" if T > 1 else "rowwise",
        "torch_ghost": "ghost",
        "torch_per_example": "direct",
    }

    # correctness first: fused results against the float32 torch references (fresh random data)
    checks: Dict[str, Optional[float]] = {}
    ref_norms = None
    for ref_op in ("torch_per_example", "torch_ghost"):
        est = estimate_extra(ref_op, B, T, d, p, elem)
        if free is None or est < 0.8 * (common.free_bytes(device) or 0):
            try:
                ref_norms = fns[ref_op]()
                break
            except Exception as e:
                if not common.is_oom(e):
                    raise
                common.release(device)
    if args.check:
        for op in ("norms_auto", "norms_ghost", "norms_direct"):
            try:
                got = fns[op]()
                checks[op] = float((got - ref_norms).norm() / ref_norms.norm()) if ref_norms is not None else None
            except Exception as e:
                checks[op] = None
                print(f"  check {op} failed: {type(e).__name__}: {e}", flush=True)
        try:
            got_w, _ = fns["clipped_grad"]()
            ref_w, _ = functional.linear_clipped_grad(x, G, c, bias=bias, noise_std=1.0, generator=key, backend="torch")
            checks["clipped_grad"] = float((got_w.float() - ref_w.float()).norm() / ref_w.float().norm())
            del got_w, ref_w
        except Exception as e:
            checks["clipped_grad"] = None
            print(f"  check clipped_grad failed: {type(e).__name__}: {e}", flush=True)
    del ref_norms
    common.release(device)

    gemm_ms = None
    for op in OPS:
        if op not in args.ops:
            continue
        row: Dict[str, Any] = {
            "op": op,
            "label": LABELS[op],
            "method": methods.get(op, ""),
            "backend": "torch" if op in ("gemm", "torch_ghost", "torch_per_example") else backend,
        }
        fl = flops(op, B, T, d, p, methods.get(op))
        row["flops"] = fl
        if op in ("norms_auto", "norms_ghost", "norms_direct", "clipped_grad"):
            row["rel_err_vs_torch"] = checks.get(op)
        est = estimate_extra(op, B, T, d, p, elem)
        free = common.free_bytes(device)
        if free is not None and est > 0.8 * free:
            row["status"] = f"skipped: needs ~{fmt_bytes(est)} extra, {fmt_bytes(free)} free"
            print(f"  {op}: {row['status']}", flush=True)
            rows.append(row)
            continue
        try:
            fns[op]()  # prime: compiles / autotunes outside the warm-up estimate
            common.sync(device)
            row["peak_extra_bytes"] = common.peak_extra_bytes(fns[op], device)
            t = common.time_fn(
                fns[op],
                device,
                warmup=args.warmup,
                min_reps=args.min_reps,
                max_reps=args.max_reps,
                target_ms=args.target_ms,
            )
            row.update(t)
            row["tflops"] = fl / (t.ms * 1e-3) / 1e12
            row["gbps_inputs"] = summary["bytes_inputs"] / (t.ms * 1e-3) / 1e9  # one read of x and G
            row["status"] = "ok"
            if op == "gemm":
                gemm_ms = t.ms
            if gemm_ms:
                row["ratio_to_gemm"] = t.ms / gemm_ms
        except Exception as e:
            row["status"] = "OOM" if common.is_oom(e) else f"failed: {type(e).__name__}: {str(e)[:200]}"
            print(f"  {op}: {row['status']}", flush=True)
        finally:
            common.release(device)
        rows.append(row)
    fused = [r["ratio_to_gemm"] for r in rows if r["op"].startswith("norms_") and "ratio_to_gemm" in r]
    summary["gemm_ms"] = gemm_ms
    summary["best_fused_norm_ratio"] = min(fused) if fused else None
    if gemm_ms and summary.get("norm_memory_floor_ms") is not None:
        summary["norm_memory_floor_ratio"] = summary["norm_memory_floor_ms"] / gemm_ms
    return summary, rows


# ------------------------------------------------------------------ report -----------------


def shape_str(s: Dict[str, Any]) -> str:
    return f"({s['B']},{s['T']},{s['d']},{s['p']})"


def floor_note(s: Dict[str, Any]) -> str:
    T, d, p = s["T"], s["d"], s["p"]
    if T == 1:
        note = f"T=1, memory-bound: read x and G once = {fmt_bytes(s['bytes_inputs'])}"
        if s.get("norm_memory_floor_ms") is not None:
            note += f" ≈ {s['norm_memory_floor_ms'] * 1e3:.1f} µs at the measured copy bandwidth"
        return note
    return f"min(T(d+p)/(dp),1) = {s['floor_ratio']:.3f} (auto: {choose_method(T, d, p)})"


def render(
    summaries: List[Dict[str, Any]],
    all_rows: List[Tuple[Dict[str, Any], List[Dict[str, Any]]]],
    ceilings: Dict[str, Any],
    backend: str,
) -> str:
    out = []
    out.append("## Ceilings measured on this device\n")
    out.append(md_table(["quantity", "value"], [[k, v] for k, v in ceilings.items()]))
    out.append("\n## Per shape: floor and FLOP counts\n")
    out.append(
        "Floor of a fused norm relative to the weight-grad GEMM: min(T(d+p)/(dp), 1) of its "
        "arithmetic (T=1: memory-bound, one read of x and G). FLOPs: GEMM 2BTdp; ghost "
        "2BT²(d+p) halved by symmetry; direct 2BTdp.\n"
    )
    hdr = [
        "shape (B,T,d,p)",
        "dtype",
        "auto picks",
        "floor",
        "GEMM GFLOP",
        "ghost GFLOP",
        "direct GFLOP",
        "GEMM ms",
        "GEMM TFLOP/s",
        "best fused norm / GEMM",
        "note",
    ]
    body = []
    for s in summaries:
        gemm_tf = s["gemm_flops"] / (s["gemm_ms"] * 1e-3) / 1e12 if s.get("gemm_ms") else None
        if s["T"] == 1:
            mf = s.get("norm_memory_floor_ratio")
            floor_cell = "memory-bound" + (f" ({mf:.3f})" if mf is not None else "")
        else:
            floor_cell = f"{s['floor_ratio']:.3f}"
        body.append(
            [
                shape_str(s),
                s["dtype"],
                s["auto_method"],
                floor_cell,
                s["gemm_flops"] / 1e9,
                s["ghost_flops"] / 1e9,
                s["direct_flops"] / 1e9,
                s.get("gemm_ms"),
                gemm_tf,
                s.get("best_fused_norm_ratio"),
                s.get("skipped") or floor_note(s),
            ]
        )
    out.append(md_table(hdr, body))
    out.append(f"\n## Per op (dpkernels backend: {backend})\n")
    out.append(
        "ratio = median time / median time of the weight-grad GEMM of the same shape and dtype; "
        "peak extra = max allocated during one call minus allocated before it (inputs).\n"
    )
    hdr = [
        "shape",
        "dtype",
        "op",
        "method",
        "ms (median)",
        "ratio to GEMM",
        "TFLOP/s",
        "GB/s (x,G once)",
        "peak extra mem",
        "rel. err vs torch",
        "status",
    ]
    body = []
    for s, rows in all_rows:
        for r in rows:
            err = r.get("rel_err_vs_torch")
            body.append(
                [
                    shape_str(s),
                    s["dtype"],
                    r["label"],
                    r.get("method"),
                    r.get("median_ms"),
                    r.get("ratio_to_gemm"),
                    r.get("tflops"),
                    r.get("gbps_inputs"),
                    fmt_bytes(r.get("peak_extra_bytes")),
                    f"{err:.1e}" if isinstance(err, float) else "–",
                    r.get("status"),
                ]
            )
    out.append(md_table(hdr, body))
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--dtypes", nargs="+", default=DTYPES, choices=sorted(common.DTYPES))
    ap.add_argument("--shapes", nargs="+", default=None, help="B,T,d,p ... (default: the issue's five)")
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument(
        "--backend",
        default=None,
        help="dpkernels backend of the fused rows (default triton; smoke: triton under TRITON_INTERPRET=1, else torch)",
    )
    ap.add_argument("--bias", action="store_true", help="include the bias term in norms and clipped grad")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--min-reps", type=int, default=None)
    ap.add_argument("--max-reps", type=int, default=None)
    ap.add_argument("--target-ms", type=float, default=None, help="measured time per op to aim for")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the accuracy check")
    args = ap.parse_args(argv)

    device = common.pick_device(args.smoke)
    if args.smoke:
        shapes = SMOKE_SHAPES
        backend = args.backend or common.smoke_dp_backend()
        args.warmup = args.warmup or 1
        args.min_reps = args.min_reps or 2
        args.max_reps = args.max_reps or 3
        args.target_ms = args.target_ms or 1.0
    else:
        shapes = SHAPES
        backend = args.backend or "triton"
        args.warmup = args.warmup or 5
        args.min_reps = args.min_reps or 10
        args.max_reps = args.max_reps or 100
        args.target_ms = args.target_ms or 200.0
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    dtypes = [common.DTYPES[n] for n in args.dtypes]
    budget = common.Budget(args.budget_s)

    env = common.env_record(device, script="bench_linear_ops", dp_backend=backend, bias=args.bias, smoke=args.smoke)
    print(
        f"# linear ops on {env['device']} (dpkernels backend {backend}; commit {env['dpkernels_commit']})", flush=True
    )
    ceilings = measure_ceilings(device, dtypes, args.smoke)
    print("  ceilings: " + ", ".join(f"{k}={v:.1f}" for k, v in ceilings.items()), flush=True)

    summaries, all_rows = [], []
    for shape in shapes:
        for dt in dtypes:
            if budget.exhausted():
                s = {
                    "B": shape[0],
                    "T": shape[1],
                    "d": shape[2],
                    "p": shape[3],
                    "dtype": common.dtype_name(dt),
                    "auto_method": choose_method(*shape[1:]),
                    "floor_ratio": floor_ratio(*shape[1:]),
                    "gemm_flops": flops("gemm", *shape),
                    "ghost_flops": flops("norms_ghost", *shape),
                    "direct_flops": flops("norms_direct", *shape),
                    "skipped": f"time budget of {args.budget_s:.0f} s spent",
                }
                print(f"  skip {shape} {s['dtype']}: {s['skipped']}", flush=True)
                summaries.append(s)
                all_rows.append((s, []))
                continue
            print(f"- {shape} {common.dtype_name(dt)}", flush=True)
            s, rows = run_config(shape, dt, device, args, backend, ceilings)
            common.release(device)  # the configuration's tensors died with run_config's frame
            for r in rows:
                if r.get("status") == "ok":
                    print(
                        f"    {r['op']:<18} {r['median_ms']:9.4f} ms  x{r.get('ratio_to_gemm', float('nan')):6.2f}  "
                        f"{r['tflops']:8.2f} TFLOP/s  +{fmt_bytes(r.get('peak_extra_bytes'))}",
                        flush=True,
                    )
            summaries.append(s)
            all_rows.append((s, rows))

    md = render(summaries, all_rows, ceilings, backend)
    payload = {"ceilings": ceilings, "configs": [{"summary": s, "rows": rows} for s, rows in all_rows]}
    paths = common.write_results("linear_ops", device, env, payload, md, args.out_dir)
    print("\n" + md.split("## Per op")[0][-4000:], flush=True)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
