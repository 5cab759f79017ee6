"""Predicted peak GPU memory of one training step, computed on any machine (no GPU, no FLOPs).

Each mode of bench_step.py runs on the ``meta`` device (tensors with shapes and no data) under
a dispatch mode that counts the bytes of every live tensor storage, rounded up to the 512-byte
blocks of PyTorch's CUDA caching allocator. What ``torch.cuda.max_memory_allocated`` reports is
the peak of exactly that sum, so the figures predict bench_step's "peak memory" column, up to
what the meta run cannot see:

* dpkernels' kernels run their fake implementations (every kernel is a ``dpkernels::`` operator
  with one, ``dpkernels/ops/_library.py``): their outputs are allocated and counted, nothing is
  launched. The transient buffers an op allocates inside beside its outputs are not modelled:
  per-tile partial sums (B × tiles float32), and the (B, p) float32 per-example bias sums of the
  linear and conv clipped sums (1 MiB on 8 × Linear(1024) with B = 256, T = 1: its predicted peak
  ratio is 1.015 where the launcher-patching model of 2026-11-23 counted 1.030).
* Scaled-dot-product attention is replaced by the aten kernel a GPU runs for the dtype
  (memory-efficient attention for float32, flash attention for bfloat16), so attention saves
  what it saves on a GPU (output and log-sum-exp, never the T x T matrix).
* cuBLAS/cuDNN workspaces and allocator fragmentation are not modelled; both are the same for
  every mode up to the cuBLAS workspace (a few MiB), so the ratios are the meaningful output.

The peak is taken over one step after two warm-up steps (optimizer state exists by then), as
bench_step.py does. Ratios are to non-private on the same model and dtype.

    python -m bench.memory_model            # every bench_step workload, float32 and bfloat16,
                                            # written to bench/results/memory_model-meta-<date>.md/.json
    python -m bench.memory_model --workloads gpt --dtype float32 --modes non_private dpkernels --timeline
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import weakref
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from bench import bench_step, common, models  # noqa: E402
from bench.common import fmt_bytes, md_table  # noqa: E402

BLOCK = 512  # the CUDA caching allocator rounds every request up to a multiple of 512 bytes
MODES = bench_step.MODES


def _rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages created by ops run under it (plus any tensors
    handed to ``adopt``), and their peak. A storage is counted once however many views share it
    and leaves the count when it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ids: set = set()
        self.timeline: List[Tuple[str, int]] = []
        self.record_timeline = False

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._ids.discard(key)

    def adopt(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._ids:
            return
        n = _rounded(storage.nbytes())
        self._ids.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, n)

    def reset_peak(self) -> None:
        self.peak = self.live
        self.timeline = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.adopt(t)
        if self.record_timeline:
            self.timeline.append((str(func.overloadpacket.__name__), self.live))
        return out


@contextlib.contextmanager
def gpu_like_execution() -> Iterator[None]:
    """SDPA becomes the fused kernel a GPU would run. (dpkernels' kernels need nothing: on meta
    tensors they run their fake implementations.)"""

    def fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p:
            raise NotImplementedError("the memory model covers causal SDPA without mask or dropout")
        if q.dtype in (torch.bfloat16, torch.float16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, is_causal, scale=scale)[
            0
        ]

    old_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = old_sdpa


def _step_args(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments bench_step's mode builders read, for a meta-device run."""
    return argparse.Namespace(
        seed=0,
        optimizer=args.optimizer,
        sigma=1.0,
        max_grad_norm=1.0,
        norm_method=args.norm_method,
        dp_backend="triton",
        check=False,
        clipping=getattr(args, "clipping", "flat"),
    )


def measure(kind: str, cfg: Any, mode: str, dtype_opt: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Peak live bytes of one step of ``mode`` on a model of ``kind`` and ``cfg`` (meta device)."""
    w = bench_step.Workload(kind, kind, cfg, torch.device("meta"), dtype_opt, _step_args(args))
    tracker = LiveBytes()
    res: Dict[str, Any] = {"mode": mode}
    try:
        with gpu_like_execution(), tracker:
            step, _set_noise, keep, model = bench_step.BUILDERS[mode](w)
            if mode == "dpkernels":
                keep[1].check_finite = False  # a finiteness check reads values; meta tensors have none
            for t in (
                list(model.parameters()) + list(model.buffers()) + [k for k in keep if isinstance(k, torch.Tensor)]
            ):
                tracker.adopt(t)
            step()
            step()
            res["resident_bytes"] = tracker.live
            tracker.reset_peak()
            tracker.record_timeline = args.timeline
            step()
            res["peak_bytes"] = tracker.peak
            res["timeline"] = tracker.timeline
            res["status"] = "ok"
            del step, keep, model
    except Exception as e:  # a mode that cannot run on meta says so and the others go on
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        res["status"] = f"failed: {type(e).__name__}: {first}"
    return res


def run(workloads: Dict[str, Tuple[str, Any]], args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every (dtype, workload, mode) of the request; each result row carries its ratio to non-private."""
    results = []
    for dtype_opt in args.dtype:
        for name, (kind, cfg) in workloads.items():
            rows = [measure(kind, cfg, mode, dtype_opt, args) for mode in args.modes]
            base = next((r["peak_bytes"] for r in rows if r["mode"] == "non_private" and r["status"] == "ok"), None)
            for r in rows:
                if base and r["status"] == "ok":
                    r["peak_ratio"] = r["peak_bytes"] / base
            results.append(
                {
                    "workload": name,
                    "describe": cfg.describe(),
                    "config": models.config_dict(cfg),
                    "dtype": dtype_opt,
                    "modes": rows,
                }
            )
    return results


def render(results: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    parts = [
        f"Predicted peak memory of one training step (optimizer {args.optimizer}, dpkernels norm method "
        f"{args.norm_method}, dpkernels clipping {args.clipping}), from a meta-device run counting live "
        "tensor storages in 512-byte blocks "
        "(bench/memory_model.py explains what it models and what it does not). 'resident': between two "
        "steps (parameters, gradients, optimizer state, batch); 'peak': the maximum during a step after "
        "two warm-up steps. A prediction, not a GPU measurement.\n"
    ]
    for res in results:
        parts.append(f"### {res['workload']} — {res['describe']} — {res['dtype']}\n")
        rows = []
        for r in res["modes"]:
            ratio = r.get("peak_ratio")
            rows.append(
                [
                    r["mode"],
                    fmt_bytes(r.get("resident_bytes")),
                    fmt_bytes(r.get("peak_bytes")),
                    f"{ratio:.3f}" if ratio is not None else "–",
                    r["status"],
                ]
            )
        parts.append(md_table(["mode", "resident", "peak in a step", "peak / non-private", "status"], rows))
        parts.append("")
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the tiny shapes of bench_step --smoke; results to /tmp")
    ap.add_argument("--workloads", nargs="+", default=list(bench_step.WORKLOADS), choices=list(bench_step.WORKLOADS))
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--norm-method", default="auto", choices=["auto", "ghost", "direct"])
    ap.add_argument(
        "--clipping",
        default="flat",
        choices=["flat", "automatic", "per_layer"],
        help="dpkernels clipping style (the other engines always clip flat)",
    )
    ap.add_argument("--out-dir", default=None, help="result folder (default bench/results/; smoke: /tmp)")
    ap.add_argument("--timeline", action="store_true", help="print live memory after each op of the measured step")
    args = ap.parse_args(argv)

    table = bench_step.SMOKE_WORKLOADS if args.smoke else bench_step.WORKLOADS
    workloads = {n: table[n] for n in args.workloads}
    results = run(workloads, args)
    if args.timeline:
        for res in results:
            for r in res["modes"]:
                for op, live in r.pop("timeline", []):
                    print(f"{res['workload']} {res['dtype']} {r['mode']} {op:<40} {live / 2**20:10.1f} MiB")
    for res in results:
        for r in res["modes"]:
            r.pop("timeline", None)
    md = render(results, args)
    env = common.env_record(
        torch.device("cpu"),
        script="memory_model",
        optimizer=args.optimizer,
        norm_method=args.norm_method,
        clipping=args.clipping,
        smoke=args.smoke,
    )
    env.update(device="meta (predicted; no GPU involved)", device_tag="meta")
    out_dir = Path(args.out_dir) if args.out_dir else (common.SMOKE_DIR if args.smoke else common.RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = (
        "memory_model"
        + ("" if args.optimizer == "sgd" else f"_{args.optimizer}")
        + ("" if args.clipping == "flat" else f"_{args.clipping}")
    )
    stem = out_dir / f"{name}-meta-{common.today()}"
    doc = {"environment": env, "results": results}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(
        f"# memory model — {env['date']}\n\n## Environment\n\n{common.env_markdown(env)}\n\n{md}\n"
    )
    print(md)
    print(f"wrote {stem}.md, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
