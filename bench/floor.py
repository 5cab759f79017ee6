"""Arithmetic floor of single-backward flat clipping, per layer and per training step.

A linear layer y = x Wᵀ + b with x (B, T, d) and output p already costs three GEMMs of
F = 2·B·T·d·p FLOPs each in non-private training: forward, grad-input, grad-weight. Flat
clipping in one backward (dpkernels' book-keeping) adds one per-example norm computation per
layer and replaces the grad-weight GEMM by the clipped-sum GEMM (same FLOPs, with the row
scale and the noise fused). The norm costs at least

    r · F,    r = min(T(d+p) / (dp), 1)

(ghost: 2BT²(d+p) FLOPs; direct: 2BTdp, one GEMM; the cheaper of the two). So the step's
floor is

    ratio_floor = Σ_l (3 + r_l) F_l / Σ_l 3 F_l

over the linear layers (other work, such as attention's matmuls, only adds to both sides and
lowers the ratio; shown separately). The ghost plane is symmetric, so a kernel that computes
each pair once does half the ghost arithmetic: the "with symmetry" column uses
min(T(d+p)/(2dp), 1). For T = 1 the norm is ‖x_i‖²‖G_i‖², memory-bound: r ≈ 0 in FLOPs, and
one read of x and G (the bytes are shown).

The memory floor: the layer's grad-output G (B, T, p) is kept from backward to the step
(x is saved by autograd anyway); its bytes are shown per step.

    python bench/floor.py              # the step benchmark's workloads, full size
    python bench/floor.py --smoke      # the smoke workloads
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, models  # noqa: E402
from bench.bench_step import SMOKE_WORKLOADS, WORKLOADS  # noqa: E402
from bench.common import fmt_bytes, md_table  # noqa: E402


def layer_floor(B: int, T: int, d: int, p: int) -> Dict[str, float]:
    from dpkernels.ops.linear_sq_norms import choose_method  # late: after TRITON_INTERPRET is settled

    F = 2.0 * B * T * d * p
    r = min(T * (d + p) / (d * p), 1.0)
    r_sym = min(T * (d + p) / (2.0 * d * p), 1.0)
    return {
        "gemm_flops": F,
        "r": r,
        "r_sym": r_sym,
        "norm_flops": r * F,
        "norm_flops_sym": r_sym * F,
        "method": choose_method(T, d, p),
    }


def workload_floor(kind: str, cfg) -> Dict[str, Any]:
    B = cfg.batch
    layers = []
    for name, d, p, T in models.linear_layers(kind, cfg):
        lf = layer_floor(B, T, d, p)
        lf.update(
            {
                "name": name,
                "d": d,
                "p": p,
                "T": T,
                "G_bytes_fp32": 4.0 * B * T * p,
                "xG_bytes_fp32": 4.0 * B * T * (d + p),
            }
        )
        layers.append(lf)
    base = sum(3 * l["gemm_flops"] for l in layers)
    extra = sum(l["norm_flops"] for l in layers)
    extra_sym = sum(l["norm_flops_sym"] for l in layers)
    attn = 3 * models.attention_flops(kind, cfg)  # forward + backward (2x) of QKᵀ and PV, causal
    return {
        "layers": layers,
        "linear_flops_step": base,
        "norm_flops_step": extra,
        "attention_flops_step": attn,
        "ratio_floor": (base + extra) / base,
        "ratio_floor_sym": (base + extra_sym) / base,
        "ratio_floor_with_attention": (base + attn + extra) / (base + attn),
        "kept_G_bytes_fp32": sum(l["G_bytes_fp32"] for l in layers),
    }


def measured_ratios(path: Optional[Path], workloads) -> Dict[str, Dict[str, float]]:
    """{workload: {dtype: dpkernels time ratio}} from a step results file, if there is one;
    only for workloads whose configuration is the one the floor was computed for."""
    if path is None or not path.exists():
        return {}
    doc = json.loads(path.read_text())
    out: Dict[str, Dict[str, float]] = {}
    for res in doc.get("results", []):
        wl = workloads.get(res.get("workload"))
        if wl is None or res.get("config") != models.config_dict(wl[1]):
            continue
        for r in res.get("modes", []):
            if r.get("mode") == "dpkernels" and r.get("time_ratio") is not None:
                out.setdefault(res["workload"], {})[res["dtype"]] = r["time_ratio"]
    return out


def render(floors: Dict[str, Dict[str, Any]], workloads, measured) -> str:
    parts = [__doc__.split("    python bench/floor.py")[0].strip() + "\n"]
    rows = []
    for name, f in floors.items():
        kind, cfg = workloads[name]
        meas = measured.get(name, {})
        rows.append(
            [
                name,
                cfg.describe(),
                f"{f['ratio_floor']:.3f}",
                f"{f['ratio_floor_sym']:.3f}",
                f"{f['ratio_floor_with_attention']:.3f}",
                fmt_bytes(f["kept_G_bytes_fp32"]),
                ", ".join(f"{k}: {v:.2f}" for k, v in meas.items()) or "–",
            ]
        )
    parts.append("## Step-time ratio floor (private / non-private)\n")
    parts.append(
        md_table(
            [
                "workload",
                "model",
                "floor",
                "floor, ghost symmetry",
                "floor incl. attention",
                "kept G (fp32)",
                "measured dpkernels ratio",
            ],
            rows,
        )
    )
    for name, f in floors.items():
        parts.append(f"\n### {name}: per layer\n")
        seen: Dict[tuple, List[str]] = {}
        for l in f["layers"]:
            seen.setdefault((l["d"], l["p"], l["T"]), []).append(l["name"])
        rows = []
        for (d, p, T), names in seen.items():
            l = next(x for x in f["layers"] if (x["d"], x["p"], x["T"]) == (d, p, T))
            label = names[0] if len(names) == 1 else f"{names[0]} (x{len(names)})"
            note = f"memory-bound: reads {fmt_bytes(l['xG_bytes_fp32'])} (fp32)" if T == 1 else ""
            rows.append(
                [label, d, p, T, l["gemm_flops"] / 1e9, f"{l['r']:.3f}", f"{l['r_sym']:.3f}", l["method"], note]
            )
        parts.append(md_table(["layer", "d", "p", "T", "GEMM GFLOP", "r", "r (symmetry)", "cheaper", "note"], rows))
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument(
        "--compare",
        default=None,
        help="a step results JSON to show measured ratios beside the floor "
        "(default: today's step file of this device in the output folder, if any)",
    )
    args = ap.parse_args(argv)
    import torch

    device = torch.device("cuda") if (torch.cuda.is_available() and not args.smoke) else torch.device("cpu")
    workloads = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    floors = {name: workload_floor(kind, cfg) for name, (kind, cfg) in workloads.items()}
    compare = Path(args.compare) if args.compare else None
    if compare is None:
        for d in common.result_dirs(device, args.out_dir):
            cand = d / f"step-{common.device_tag(device)}-{common.today()}.json"
            if cand.exists():
                compare = cand
                break
    measured = measured_ratios(compare, workloads)
    env = common.env_record(device, script="floor", compared_with=str(compare) if compare else None, smoke=args.smoke)
    md = render(floors, workloads, measured)
    payload = {
        "floors": {k: {**v, "describe": workloads[k][1].describe()} for k, v in floors.items()},
        "measured_dpkernels_ratio": measured,
    }
    paths = common.write_results("floor", device, env, payload, md, args.out_dir)
    print(md.split("### ")[0], flush=True)
    g = floors.get("gpt")
    if g:
        print(
            f"GPT step-time ratio floor (private / non-private): {g['ratio_floor']:.3f} "
            f"(ghost symmetry {g['ratio_floor_sym']:.3f}; "
            f"with attention matmuls {g['ratio_floor_with_attention']:.3f})",
            flush=True,
        )
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
