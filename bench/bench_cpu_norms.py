"""Per-example conv norms on the CPU: the torch backend's methods side by side, and what auto picks.

For each convolution (the demo CNN's layers, CIFAR and ImageNet ResNet layers, a 1×1, a
depthwise and a 7×7 stem), the time of ``functional.conv_sq_norms(..., backend="torch")`` with

    ghost           patch matrices (csrc/patches_cpu.cpp) and both L×L Gram matrices
    direct          per-example weight gradients by one grouped convolution backward per chunk
                    of examples (``ops.conv_sq_norms.conv_weight_sq_norms_reference``), no patches
    direct_patches  the earlier direct path: patch matrices, then a batched matmul G_iᵀU_i
    auto            what ``method="auto"`` runs (``ops.linear_sq_norms.choose_method_torch``)

with the patch build alone for scale, the multiply-add ratio ghost/direct = L(d + p)/(dp), and
every method's norms checked against the direct method's. Median of several calls after one
warm-up; ghost is skipped where it would cost over 40 times direct's multiply-adds.

    python bench/bench_cpu_norms.py            # writes bench/results/cpu_conv_norms-CPU-<date>.{md,json}
    python bench/bench_cpu_norms.py --smoke    # two small layers, /tmp
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

# (label, B, C_in, C_out, H = W, kernel, stride, padding, groups)
LAYERS = [
    ("demo CNN conv1", 128, 1, 16, 8, 3, 1, 1, 1),
    ("demo CNN conv2", 128, 16, 32, 8, 3, 2, 1, 1),
    ("CIFAR ResNet stem", 64, 3, 16, 32, 3, 1, 1, 1),
    ("CIFAR ResNet 16ch", 64, 16, 16, 32, 3, 1, 1, 1),
    ("CIFAR ResNet down 16->32", 64, 16, 32, 32, 3, 2, 1, 1),
    ("CIFAR ResNet 32ch", 64, 32, 32, 16, 3, 1, 1, 1),
    ("CIFAR ResNet 64ch", 64, 64, 64, 8, 3, 1, 1, 1),
    ("ResNet-50 3x3 64ch 56x56", 32, 64, 64, 56, 3, 1, 1, 1),
    ("ResNet 3x3 256ch 14x14", 32, 256, 256, 14, 3, 1, 1, 1),
    ("ResNet 3x3 512ch 7x7", 32, 512, 512, 7, 3, 1, 1, 1),
    ("ResNet-50 1x1 256->64 56x56", 32, 256, 64, 56, 1, 1, 0, 1),
    ("depthwise 3x3 64ch 56x56", 32, 64, 64, 56, 3, 1, 1, 64),
    ("ImageNet stem 7x7/2 224", 32, 3, 64, 224, 7, 2, 3, 1),
]
SMOKE = [LAYERS[0], LAYERS[1]]


def _time(fn: Callable[[], Any], budget_s: float = 0.3) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    reps = max(2, min(20, int(budget_s / max(once, 1e-5))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _direct_patches(x, g, geometry) -> torch.Tensor:
    from dpkernels.ops import conv_patches
    from dpkernels.ops.linear_sq_norms import linear_sq_norms_reference

    patches = conv_patches.input_patches(x, geometry)
    rows = conv_patches.output_gradient_rows(g, geometry)
    n, B, L, d = patches.shape
    norms = linear_sq_norms_reference(
        patches.reshape(n * B, L, d), rows.view(n * B, L, rows.shape[-1]), False, "direct"
    )
    return norms.view(n, B).sum(dim=0)


def measure(layer: tuple) -> Dict[str, Any]:
    from dpkernels import functional
    from dpkernels.ops import conv_patches
    from dpkernels.ops.linear_sq_norms import choose_method_torch

    label, B, cin, cout, hw, k, s, p, groups = layer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, cin, hw, hw, generator=gen)
    out = (hw + 2 * p - k) // s + 1
    g = torch.randn(B, cout, out, out, generator=gen)
    shape = (cout, cin // groups, k, k)
    geometry = conv_patches.ConvGeometry.from_args(shape, s, p, 1, groups)
    L, d, pg = out * out, geometry.patch_features, cout // groups
    kwargs = dict(stride=s, padding=p, groups=groups, bias=False, backend="torch")
    res: Dict[str, Any] = {
        "layer": label,
        "B": B,
        "L": L,
        "d": d,
        "p": pg,
        "mac_ratio_ghost_direct": L * (d + pg) / (d * pg),
        "auto": choose_method_torch(L, d, pg),
    }
    ref = functional.conv_sq_norms(x, g, shape, method="direct", **kwargs)
    runs = {
        "ghost": lambda: functional.conv_sq_norms(x, g, shape, method="ghost", **kwargs),
        "direct": lambda: functional.conv_sq_norms(x, g, shape, method="direct", **kwargs),
        "direct_patches": lambda: _direct_patches(x, g, geometry),
    }
    res["patches_ms"] = _time(lambda: conv_patches.input_patches(x, geometry))
    worst = 0.0
    for name, fn in runs.items():
        if name == "ghost" and res["mac_ratio_ghost_direct"] > 40:
            res[f"{name}_ms"] = None
            continue
        worst = max(worst, ((fn() - ref).abs() / ref.abs().clamp_min(1e-30)).max().item())
        res[f"{name}_ms"] = _time(fn)
    res["max_rel_diff"] = worst
    res["auto_ms"] = res[f"{res['auto']}_ms"]
    print(
        f"- {label}: "
        + ", ".join(
            f"{m} {res[f'{m}_ms']:.2f}" if res[f"{m}_ms"] is not None else f"{m} -"
            for m in ("patches", "ghost", "direct", "direct_patches")
        )
        + f" (auto: {res['auto']})",
        flush=True,
    )
    return res


def render(rows: List[Dict[str, Any]]) -> str:
    def ms(v: Optional[float]) -> str:
        return "–" if v is None else f"{v:.2f}"

    table = [
        [
            r["layer"],
            r["B"],
            r["L"],
            r["d"],
            r["p"],
            f"{r['mac_ratio_ghost_direct']:.2f}",
            ms(r["patches_ms"]),
            ms(r["ghost_ms"]),
            ms(r["direct_ms"]),
            ms(r["direct_patches_ms"]),
            f"{r['auto']} ({ms(r['auto_ms'])})",
            f"{r['max_rel_diff']:.1e}",
        ]
        for r in rows
    ]
    return "## Conv per-example norms, torch backend on the CPU (ms, median)\n\n" + common.md_table(
        [
            "layer",
            "B",
            "L",
            "d",
            "p",
            "MACs ghost/direct",
            "patches",
            "ghost",
            "direct",
            "direct (patches)",
            "auto",
            "max rel diff",
        ],
        table,
    )


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    args = ap.parse_args(argv)
    env = common.env_record(
        torch.device("cpu"),
        script="bench_cpu_norms",
        smoke=args.smoke,
        threads=torch.get_num_threads(),
        **({} if args.smoke else {"device_tag": "CPU"}),
    )
    print(f"# conv norms on {env['device']} (commit {env['dpkernels_commit']})", flush=True)
    rows = [measure(layer) for layer in (SMOKE if args.smoke else LAYERS)]
    md = render(rows)
    paths = common.write_results(
        "cpu_conv_norms", torch.device("cpu"), env, {"results": rows}, md, args.out_dir, cpu_results=not args.smoke
    )
    print("\n" + md, flush=True)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
