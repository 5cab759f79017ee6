"""Micro-benchmark of the embedding, convolution and normalisation-layer kernels against what
non-private backward does for the same parameter.

Embedding, tokens (B, T) into a (V, p) table, G (B, T, p) random:

    backward        aten.embedding_dense_backward(G, tokens)       nn.Embedding's weight gradient
    norms           functional.embedding_sq_norms (Triton ghost kernel over equal tokens)
    torch norms     the sort-based torch reference (backend="torch")
    clipped grad    functional.embedding_clipped_grad(noise_std=1): scaled row scatter + noise
                    over the whole table
    noise alone     functional.gaussian_noise of the table: the part of the clipped grad that
                    non-private training never pays (V·p draws, one write)

Conv2d, x (B, C_in, H, W) with a k×k kernel (and groups), G its output gradient:

    backward        torch.nn.grad.conv2d_weight: the non-private weight gradient (cuDNN)
    norms auto / ghost / direct
                    functional.conv_sq_norms (direct: implicit-im2col Triton kernel; ghost:
                    patches materialised, then the fused linear ghost kernel)
    torch norms     the same on the torch backend
    clipped grad    functional.conv_clipped_grad(noise_std=1): conv backward of (c∘G, x) + noise

LayerNorm, x (B, T, n), and GroupNorm, x (B, C, H, W):

    backward        aten.native_{layer,group}_norm_backward with every output (input, weight, bias)
    input only      the same with the input gradient alone (what DP layers ask torch for)
    per-example     functional.{layer,group}_norm_per_example_grads (Triton, the forward's statistics)
    torch per-example  the torch reference
    clip-sum-noise  functional.clip_sum_noise of the (B, n) weight gradients (noise_std=1)

The cost a DP layer adds to backward is (input only + per-example) − backward; the step adds
clip-sum-noise. Reported: median time, ratio to 'backward', peak extra memory.

    python bench/bench_layer_ops.py                  # GPU
    TRITON_INTERPRET=1 python bench/bench_layer_ops.py --smoke
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.common import fmt_bytes, md_table  # noqa: E402

# (B, T, V, p): GPT-2 tokens, a LLaMA-sized table with long sequences, T = 1 (a lookup per example)
EMBEDDING_SHAPES = [(32, 256, 50257, 768), (8, 2048, 32000, 4096), (256, 1, 50257, 768)]
SMOKE_EMBEDDING_SHAPES = [(2, 9, 17, 12), (5, 1, 11, 8)]
# (B, C_in, H=W, C_out, k, groups): a CIFAR ResNet block, a deeper ResNet stage, a ConvNeXt-style depthwise 7×7
CONV_SHAPES = [(64, 64, 32, 64, 3, 1), (32, 256, 14, 256, 3, 1), (32, 384, 28, 384, 7, 384)]
SMOKE_CONV_SHAPES = [(2, 3, 7, 5, 3, 1), (2, 4, 6, 4, 3, 2)]
# ("layer", B, T, n) / ("group", B, C, H·W, groups)
NORM_SHAPES = [("layer", 32, 256, 768), ("layer", 8, 2048, 4096), ("group", 64, 256, 1024, 32)]
SMOKE_NORM_SHAPES = [("layer", 3, 7, 10), ("group", 2, 6, 9, 3)]
DTYPES = ["float32", "bfloat16"]


def _time(fns: Dict[str, Callable[[], Any]], device: torch.device, args, base: str) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for op, fn in fns.items():
        row: Dict[str, Any] = {"op": op}
        try:
            t = common.time_fn(
                fn, device, warmup=args.warmup, min_reps=args.min_reps, max_reps=args.max_reps, target_ms=args.target_ms
            )
            row.update(status="ok", **t, peak_extra_bytes=common.peak_extra_bytes(fn, device))
        except Exception as e:  # an OOM or a failure is a result, not the end of the benchmark
            row["status"] = "OOM" if common.is_oom(e) else f"failed: {type(e).__name__}: {str(e)[:200]}"
        common.release(device)
        rows.append(row)
    ref = next((r for r in rows if r["op"] == base and r["status"] == "ok"), None)
    for r in rows:
        if ref is not None and r["status"] == "ok":
            r["ratio"] = r["median_ms"] / ref["median_ms"]
    return rows


def run_embedding(shape, dtype: torch.dtype, device: torch.device, args, backend: str) -> Dict[str, Any]:
    from dpkernels import functional
    from dpkernels.ops.philox import PhiloxKey

    B, T, V, p = shape
    gen = common.generator(device, args.seed + 11)
    tokens = torch.randint(0, V, (B, T), generator=gen, device=device)
    G = common.randn((B, T, p), dtype=dtype, device=device, gen=gen, scale=1e-2)
    c = torch.rand(B, generator=gen, device=device) * 0.9 + 0.1
    key = PhiloxKey(seed=args.seed + 1, step=0, stream=0)
    fns = {
        "backward": lambda: torch.ops.aten.embedding_dense_backward(G.reshape(-1, p), tokens.reshape(-1), V, -1, False),
        "norms": lambda: functional.embedding_sq_norms(tokens, G, num_embeddings=V, backend=backend, check_ids=False),
        "torch norms": lambda: functional.embedding_sq_norms(
            tokens, G, num_embeddings=V, backend="torch", check_ids=False
        ),
        "clipped grad": lambda: functional.embedding_clipped_grad(
            tokens, G, c, num_embeddings=V, noise_std=1.0, generator=key, backend=backend, check_ids=False
        ),
        "noise alone": lambda: functional.gaussian_noise(
            (V, p), std=1.0, generator=key, device=device, backend=backend
        ),
    }
    check = None
    if args.check:  # the fused norms against the torch reference on the same data
        a, b = fns["norms"](), fns["torch norms"]()
        check = float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return {
        "layer": "embedding",
        "shape": f"B={B} T={T} V={V} p={p}",
        "dtype": common.dtype_name(dtype),
        "check_rel_err": check,
        "rows": _time(fns, device, args, "backward"),
    }


def run_conv(shape, dtype: torch.dtype, device: torch.device, args, backend: str) -> Dict[str, Any]:
    from dpkernels import functional
    from dpkernels.ops.philox import PhiloxKey

    B, C_in, HW, C_out, k, groups = shape
    gen = common.generator(device, args.seed + 13)
    x = common.randn((B, C_in, HW, HW), dtype=dtype, device=device, gen=gen)
    w_shape = (C_out, C_in // groups, k, k)
    G = common.randn((B, C_out, HW, HW), dtype=dtype, device=device, gen=gen, scale=1e-2)  # padding k // 2
    c = torch.rand(B, generator=gen, device=device) * 0.9 + 0.1
    key = PhiloxKey(seed=args.seed + 1, step=0, stream=0)
    conv = dict(padding=k // 2, groups=groups)

    def norms(method: str, be: str) -> Callable[[], Any]:
        return lambda: functional.conv_sq_norms(x, G, w_shape, method=method, backend=be, **conv)

    fns = {
        "backward": lambda: torch.nn.grad.conv2d_weight(x, w_shape, G, padding=k // 2, groups=groups),
        "norms auto": norms("auto", backend),
        "norms ghost": norms("ghost", backend),
        "norms direct": norms("direct", backend),
        "torch norms": norms("auto", "torch"),
        "clipped grad": lambda: functional.conv_clipped_grad(
            x, G, c, w_shape, noise_std=1.0, generator=key, backend=backend, **conv
        ),
    }
    check = None
    if args.check:
        a, b = fns["norms auto"](), fns["torch norms"]()
        check = float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    desc = f"Conv2d B={B} C_in={C_in} {HW}x{HW} C_out={C_out} k={k}" + (f" groups={groups}" if groups > 1 else "")
    return {
        "layer": "conv2d",
        "shape": desc,
        "dtype": common.dtype_name(dtype),
        "check_rel_err": check,
        "rows": _time(fns, device, args, "backward"),
    }


def run_norm(shape, dtype: torch.dtype, device: torch.device, args, backend: str) -> Dict[str, Any]:
    from dpkernels import functional
    from dpkernels.ops.philox import PhiloxKey

    kind = shape[0]
    gen = common.generator(device, args.seed + 12)
    key = PhiloxKey(seed=args.seed + 1, step=0, stream=0)
    if kind == "layer":
        _, B, T, n = shape
        x = common.randn((B, T, n), dtype=dtype, device=device, gen=gen)
        w = common.randn((n,), dtype=dtype, device=device, gen=gen)
        b = common.randn((n,), dtype=dtype, device=device, gen=gen)
        _, mean, rstd = torch.native_layer_norm(x, (n,), w, b, 1e-5)
        desc = f"LayerNorm B={B} T={T} n={n}"

        def backward(mask):
            return lambda: torch.ops.aten.native_layer_norm_backward(G, x, (n,), mean, rstd, w, b, mask)

        def per_example(be):
            return lambda: functional.layer_norm_per_example_grads(x, G, n, mean=mean, rstd=rstd, backend=be)
    else:
        _, B, C, HW, groups = shape
        side = int(math.isqrt(HW))
        x = common.randn((B, C, side, HW // side), dtype=dtype, device=device, gen=gen)
        w = common.randn((C,), dtype=dtype, device=device, gen=gen)
        b = common.randn((C,), dtype=dtype, device=device, gen=gen)
        _, mean, rstd = torch.ops.aten.native_group_norm(x, w, b, B, C, HW, groups, 1e-5)
        desc = f"GroupNorm B={B} C={C} HW={HW} groups={groups}"

        def backward(mask):
            return lambda: torch.ops.aten.native_group_norm_backward(G, x, mean, rstd, w, B, C, HW, groups, mask)

        def per_example(be):
            return lambda: functional.group_norm_per_example_grads(x, G, groups, mean=mean, rstd=rstd, backend=be)

    G = common.randn(tuple(x.shape), dtype=dtype, device=device, gen=gen, scale=1e-2)
    c = torch.rand(B, generator=gen, device=device) * 0.9 + 0.1
    gw, _ = per_example(backend)()
    fns = {
        "backward": backward([True, True, True]),
        "input only": backward([True, False, False]),
        "per-example": per_example(backend),
        "torch per-example": per_example("torch"),
        "clip-sum-noise": lambda: functional.clip_sum_noise(gw, c, noise_std=1.0, generator=key, backend=backend),
    }
    check = None
    if args.check:
        ref, _ = per_example("torch")()
        check = float(((gw - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
    return {
        "layer": kind + "_norm",
        "shape": desc,
        "dtype": common.dtype_name(dtype),
        "check_rel_err": check,
        "rows": _time(fns, device, args, "backward"),
    }


def render(results: List[Dict[str, Any]], backend: str) -> str:
    parts = [
        f"Median ms per call (CUDA events after warm-up, L2 flushed), dpkernels backend {backend}; "
        "'ratio' is to 'backward' (what non-private backward does for this parameter). 'check': max relative "
        "difference of the fused result from the torch reference on the same data."
    ]
    for res in results:
        parts.append(
            f"### {res['shape']} — {res['dtype']}"
            + (f" (check {res['check_rel_err']:.1e})" if res.get("check_rel_err") is not None else "")
            + (f"\n\nskipped: {res['skipped']}" if res.get("skipped") else "")
        )
        if res.get("rows"):
            parts.append(
                md_table(
                    ["op", "ms", "ratio", "peak extra", "status"],
                    [
                        [
                            r["op"],
                            common.fmt(r.get("median_ms")),
                            common.fmt(r.get("ratio")),
                            fmt_bytes(r.get("peak_extra_bytes")),
                            r["status"],
                        ]
                        for r in res["rows"]
                    ],
                )
            )
    return "\n\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--dtypes", nargs="+", default=DTYPES, choices=sorted(common.DTYPES))
    ap.add_argument("--backend", default=None, help="dpkernels backend (default triton; smoke: see bench_linear_ops)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the accuracy check")
    args = ap.parse_args(argv)

    device = common.pick_device(args.smoke)
    if args.smoke:
        emb_shapes, conv_shapes, norm_shapes = SMOKE_EMBEDDING_SHAPES, SMOKE_CONV_SHAPES, SMOKE_NORM_SHAPES
        backend = args.backend or common.smoke_dp_backend()
        args.warmup, args.min_reps, args.max_reps, args.target_ms = 1, 2, 3, 1.0
    else:
        emb_shapes, conv_shapes, norm_shapes = EMBEDDING_SHAPES, CONV_SHAPES, NORM_SHAPES
        backend = args.backend or "triton"
        args.warmup, args.min_reps, args.max_reps, args.target_ms = 5, 10, 100, 100.0
    budget = common.Budget(args.budget_s)
    env = common.env_record(device, script="bench_layer_ops", dp_backend=backend, smoke=args.smoke)
    print(
        f"# embedding, conv and norm-layer ops on {env['device']} "
        f"(backend {backend}; commit {env['dpkernels_commit']})",
        flush=True,
    )

    jobs = (
        [(run_embedding, s) for s in emb_shapes]
        + [(run_conv, s) for s in conv_shapes]
        + [(run_norm, s) for s in norm_shapes]
    )
    results: List[Dict[str, Any]] = []
    for run, shape in jobs:
        for name in args.dtypes:
            dt = common.DTYPES[name]
            if budget.exhausted():
                results.append(
                    {"shape": str(shape), "dtype": name, "skipped": f"time budget of {args.budget_s:.0f} s spent"}
                )
                continue
            try:
                res = run(shape, dt, device, args, backend)
            except Exception as e:
                res = {
                    "shape": str(shape),
                    "dtype": name,
                    "skipped": "OOM" if common.is_oom(e) else f"failed: {type(e).__name__}: {str(e)[:200]}",
                }
            common.release(device)
            results.append(res)
            for r in res.get("rows", []):
                print(
                    f"  {res['shape']} {name} {r['op']:<18} {common.fmt(r.get('median_ms')):>9} ms  "
                    f"x{common.fmt(r.get('ratio'))}  {r['status']}",
                    flush=True,
                )
            if res.get("skipped"):
                print(f"  {res['shape']} {name}: {res['skipped']}", flush=True)

    md = render(results, backend)
    paths = common.write_results("layer_ops", device, env, {"results": results}, md, args.out_dir)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 1 if any(str(r.get("skipped", "")).startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
