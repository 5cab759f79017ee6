"""Bar charts of the benchmark ratios from the results JSON files (matplotlib, optional).

    python bench/plot.py                          # every bench/results/*.json
    python bench/plot.py FILE.json ... [--out-dir DIR]

linear_ops-*.json -> one PNG per dtype: each op's time / weight-grad GEMM per shape (log scale),
                     with the arithmetic floor min(T(d+p)/(dp), 1) marked.
step-*.json       -> one PNG: time and peak memory / non-private per workload and mode, with the
                     floor of floor-*.json of the same device and date marked when it exists.
A PNG is written next to its JSON (same name, .png) unless --out-dir is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(doc: dict, what: str) -> str:
    env = doc.get("environment", {})
    return (
        f"{what} — {env.get('device', '?')} — {env.get('date', '?')[:10]} — {str(env.get('dpkernels_commit', ''))[:10]}"
    )


def plot_linear_ops(path: Path, out_dir: Path) -> List[Path]:
    plt = _plt()
    doc = json.loads(path.read_text())
    configs = doc.get("configs", [])
    written = []
    for dtype in sorted({c["summary"]["dtype"] for c in configs}):
        cs = [c for c in configs if c["summary"]["dtype"] == dtype]
        ops = [
            op
            for op in ("norms_auto", "norms_ghost", "norms_direct", "torch_ghost", "torch_per_example", "clipped_grad")
            if any(r["op"] == op for c in cs for r in c["rows"])
        ]
        if not ops:
            continue
        fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(cs)), 4.8))
        width = 0.8 / len(ops)
        for j, op in enumerate(ops):
            xs, ys = [], []
            for i, c in enumerate(cs):
                r = next((r for r in c["rows"] if r["op"] == op), None)
                if r and r.get("ratio_to_gemm"):
                    xs.append(i + (j - (len(ops) - 1) / 2) * width)
                    ys.append(r["ratio_to_gemm"])
            ax.bar(xs, ys, width, label=op)
        for i, c in enumerate(cs):
            s = c["summary"]
            fl = s.get("norm_memory_floor_ratio") if s["T"] == 1 else s.get("floor_ratio")
            if fl:
                ax.hlines(
                    fl, i - 0.45, i + 0.45, colors="k", linestyles="dashed", label="norm floor" if i == 0 else None
                )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cs)))
        ax.set_xticklabels(
            [f"B={c['summary']['B']} T={c['summary']['T']}\nd={c['summary']['d']} p={c['summary']['p']}" for c in cs],
            fontsize=8,
        )
        ax.set_ylabel("time / weight-grad GEMM")
        ax.set_title(_title(doc, f"linear ops, {dtype}"), fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        out = out_dir / f"{path.stem}-{dtype}.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)
    return written


def plot_step(path: Path, out_dir: Path) -> List[Path]:
    plt = _plt()
    doc = json.loads(path.read_text())
    results = [r for r in doc.get("results", []) if any(m.get("time_ratio") for m in r["modes"])]
    if not results:
        return []
    floors = {}
    floor_path = path.with_name(path.name.replace("step-", "floor-", 1))
    if floor_path.exists():
        floors = {k: v["ratio_floor"] for k, v in json.loads(floor_path.read_text()).get("floors", {}).items()}
    modes = [
        m
        for m in ("naive", "opacus_hooks", "opacus_ghost", "dpkernels")
        if any(x["mode"] == m for r in results for x in r["modes"])
    ]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.4 * len(results)), 4.8))
    width = 0.8 / max(1, len(modes))
    for ax, key, label in (
        (axes[0], "time_ratio", "ms/step / non-private"),
        (axes[1], "memory_ratio", "peak memory / non-private"),
    ):
        for j, m in enumerate(modes):
            xs, ys = [], []
            for i, r in enumerate(results):
                x = next((x for x in r["modes"] if x["mode"] == m), None)
                if x and x.get(key):
                    xs.append(i + (j - (len(modes) - 1) / 2) * width)
                    ys.append(x[key])
            ax.bar(xs, ys, width, label=m)
        if key == "time_ratio":
            for i, r in enumerate(results):
                if r["workload"] in floors:
                    ax.hlines(
                        floors[r["workload"]],
                        i - 0.45,
                        i + 0.45,
                        colors="k",
                        linestyles="dashed",
                        label="floor" if i == 0 else None,
                    )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels([f"{r['workload']}\n{r['dtype']}" for r in results], fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(_title(doc, "full step"), fontsize=9)
    fig.tight_layout()
    out = out_dir / f"{path.stem}.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="results JSON files (default: bench/results/*.json)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    try:
        _plt()
    except ImportError:
        print("matplotlib is not installed: pip install matplotlib", file=sys.stderr)
        return 1
    files = [Path(f) for f in args.files] or sorted((HERE / "results").glob("*.json"))
    written = []
    for f in files:
        out_dir = Path(args.out_dir) if args.out_dir else f.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        if f.name.startswith("linear_ops-"):
            written += plot_linear_ops(f, out_dir)
        elif f.name.startswith("step-"):
            written += plot_step(f, out_dir)
    for w in written:
        print(f"wrote {w}")
    if not written:
        print("nothing to plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
