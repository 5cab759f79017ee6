"""The private step on the CPU, side by side with the CPU peers, as ratios to non-private.

The CPU path is what a new user meets first (the README's demo runs there), so it is measured
against what the same user could run instead, in one process on the same cores:

    non_private   loss.backward(); optimizer.step()                     (= 1.00)
    naive         torch.func vmap(grad) per-example gradients, clip, noise
    opacus_hooks  Opacus make_private(grad_sample_mode="hooks")
    opacus_ghost  Opacus make_private(grad_sample_mode="ghost")
    dpkernels     dpkernels.make_private, flat clipping (the torch backend on CPU tensors)

Workloads (``bench/models.py``): the demo's MLP 64-256-256-10 and CNN (B=128), a GPT with 4
layers of width 256, T=64, B=16 (linear layers trained, vocabulary 50257), and 4 × Linear(512)
with B=256, T=1. Every private mode's zero-noise gradient is first checked against a
per-example loop (one backward per example). Timing: ``--rounds`` interleaved rounds (each mode
runs ``--steps`` steps in every round, the modes in turn, so that machine drift hits all of them
alike), the median step time of each mode per round, and the median over rounds of its ratio to
non-private of the same round.

``--profile``: dpkernels' step time of each workload split by the engine's phases (wall-clock
time inside ``dpkernels.ops._phases`` blocks: norms in backward, clip factors, clipped sums,
noise) and the rest of the step, in percent. (torch.profiler is not used for this: with OpenMP
on two threads its per-op overhead multiplied the step time by ~30.) Also the engine's fixed
overhead per step: dpkernels minus non-private on the same model with B=2 and no noise.

    python bench/bench_cpu.py                 # writes bench/results/cpu_step-CPU-<date>.{md,json}
    python bench/bench_cpu.py --smoke         # tiny settings, /tmp
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_step, common, models  # noqa: E402

MODES = ["non_private", "naive", "opacus_hooks", "opacus_ghost", "dpkernels"]
WORKLOADS = {
    "mlp": ("demo", models.DemoConfig("mlp", batch=128)),
    "cnn": ("demo", models.DemoConfig("cnn", batch=128)),
    "gpt": ("gpt", models.GPTConfig(seq=64, d_model=256, n_layer=4, n_head=4, d_mlp=1024, batch=16)),
    "stack": ("stack", models.StackConfig(width=512, depth=4, batch=256, seq=1)),
}
SMOKE = {
    "mlp": ("demo", models.DemoConfig("mlp", batch=16)),
    "stack": ("stack", models.StackConfig(width=32, depth=2, batch=8, seq=1)),
}
PHASES = ("dpkernels.norms", "dpkernels.clip_factors", "dpkernels.clipped_sums", "dpkernels.noise")


def _args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        seed=args.seed,
        optimizer="sgd",
        sigma=1.0,
        max_grad_norm=1.0,
        norm_method="auto",
        clipping="flat",
        dp_backend="torch",
        check=True,
    )


def _steps_time(step: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def measure(name: str, kind: str, cfg: Any, args: argparse.Namespace) -> Dict[str, Any]:
    w = bench_step.Workload(name, kind, cfg, torch.device("cpu"), "float32", _args(args))
    ref = bench_step.reference_clipped_grad(w)
    built: Dict[str, Any] = {}
    out: Dict[str, Any] = {"workload": name, "describe": cfg.describe(), "modes": {}}
    for mode in args.modes:
        res: Dict[str, Any] = {"status": "ok"}
        try:
            step, set_noise, keep, model = bench_step.BUILDERS[mode](w)
            if set_noise is not None:
                set_noise(False)
                step()  # (dpkernels: the first step also runs the guard's one-time probe)
                res["grad_rel_err_vs_loop"] = bench_step.grad_rel_err(model, ref)
                set_noise(True)
            for _ in range(args.warmup):
                step()
            built[mode] = (step, keep)
        except Exception as e:
            res["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        out["modes"][mode] = res
    # steps per mode per round: --steps, or as many as fill about half a second (at least one)
    per_round = {}
    for mode, (step, _) in built.items():
        t = time.perf_counter()
        step()
        per_round[mode] = args.steps or max(1, min(10, int(0.5 / max(time.perf_counter() - t, 1e-4))))
    rounds: Dict[str, List[float]] = {m: [] for m in built}
    for _ in range(args.rounds):
        for mode, (step, _) in built.items():
            rounds[mode].append(_steps_time(step, per_round[mode]))
    base = rounds.get("non_private")
    for mode, times in rounds.items():
        res = out["modes"][mode]
        res["median_ms"] = statistics.median(times)
        if base:
            res["ratio"] = statistics.median(t / b for t, b in zip(times, base))
    print(
        f"- {name}: "
        + ", ".join(f"{m} {r.get('ratio', float('nan')):.2f}" for m, r in out["modes"].items() if r["status"] == "ok"),
        flush=True,
    )
    if args.profile and "dpkernels" in built:
        out["profile"] = profile(built["dpkernels"][0], max(10, per_round["dpkernels"] * 3))
        out["overhead_ms"] = engine_overhead(name, kind, cfg, args)
    return out


def engine_overhead(name: str, kind: str, cfg: Any, args: argparse.Namespace) -> float:
    """The engine's fixed cost per step, ms: dpkernels' step minus the non-private step on the same
    model with 2 examples and no noise, where the arithmetic that grows with the batch is nearly
    gone and what is left is Python and per-call work (medians of 50 interleaved steps each)."""
    small = bench_step.Workload(
        name, kind, dataclasses.replace(cfg, batch=2), torch.device("cpu"), "float32", _args(args)
    )
    small.args.sigma = 0.0
    steps = {m: bench_step.BUILDERS[m](small)[0] for m in ("non_private", "dpkernels")}
    for step in steps.values():
        for _ in range(3):
            step()
    times: Dict[str, List[float]] = {m: [] for m in steps}
    for _ in range(50):
        for mode, step in steps.items():
            t = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - t)
    return 1e3 * (statistics.median(times["dpkernels"]) - statistics.median(times["non_private"]))


def profile(step: Callable[[], None], n: int) -> Dict[str, float]:
    """Percent of dpkernels' step time in each engine phase: wall-clock time inside the phases'
    marked blocks (``dpkernels.ops._phases.timing``), over ``n`` steps. Noise runs inside the
    clipped sums and is reported on its own; the rest is forward, backward without the norms,
    the optimizer's own update and Python around them."""
    from dpkernels.ops._phases import timing

    with timing() as seconds:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        total = time.perf_counter() - t0
    spent = {phase: seconds.get(phase, 0.0) for phase in PHASES}
    spent["dpkernels.clipped_sums"] -= spent["dpkernels.noise"]
    shares = {k.removeprefix("dpkernels."): 100.0 * v / total for k, v in spent.items()}
    shares["rest of the step"] = 100.0 - sum(shares.values())
    return shares


def render(results: List[Dict[str, Any]], modes: List[str]) -> str:
    rows = []
    for res in results:
        row = [f"{res['workload']}: {res['describe']}"]
        for m in modes:
            r = res["modes"].get(m, {})
            row.append(f"{r['ratio']:.2f}" if "ratio" in r else r.get("status", "–"))
        rows.append(row)
    parts = [
        "## Step time / non-private (median of interleaved rounds)\n",
        common.md_table(["workload"] + modes, rows),
        "\n## Gradient check (zero noise) vs a per-example loop\n",
    ]
    check = [
        [res["workload"]]
        + [
            f"{res['modes'][m]['grad_rel_err_vs_loop']:.1e}"
            if isinstance(res["modes"].get(m, {}).get("grad_rel_err_vs_loop"), float)
            else "–"
            for m in modes[1:]
        ]
        for res in results
    ]
    parts.append(common.md_table(["workload"] + modes[1:], check))
    parts.append("\n## Absolute step times (ms, median)\n")
    parts.append(
        common.md_table(
            ["workload"] + modes,
            [[res["workload"]] + [res["modes"].get(m, {}).get("median_ms", "–") for m in modes] for res in results],
        )
    )
    prof = [res for res in results if "profile" in res]
    if prof:
        keys = list(prof[0]["profile"])
        parts.append("\n## Where dpkernels' step time goes (wall clock per engine phase, % of the step)\n")
        parts.append(
            common.md_table(
                ["workload"] + keys + ["engine overhead (ms/step, B=2)"],
                [
                    [r["workload"]] + [f"{r['profile'][k]:.1f}" for k in keys] + [f"{r['overhead_ms']:.2f}"]
                    for r in prof
                ],
            )
        )
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--workloads", nargs="+", default=None)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument(
        "--steps", type=int, default=None, help="steps per mode per round (default: as many as fill ~0.5 s, 1 to 10)"
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    table = SMOKE if args.smoke else WORKLOADS
    names = args.workloads or list(table)
    args.rounds = args.rounds or (2 if args.smoke else 10)
    args.steps = args.steps or (2 if args.smoke else None)
    torch.set_num_threads(torch.get_num_threads())
    env = common.env_record(
        torch.device("cpu"),
        script="bench_cpu",
        smoke=args.smoke,
        threads=torch.get_num_threads(),
        **({} if args.smoke else {"device_tag": "CPU"}),
    )
    import dpkernels

    env["dpkernels_backends"] = {k: v["available"] for k, v in dpkernels.backends(load_cuda=False).items()}
    print(f"# CPU step on {env['device']} (commit {env['dpkernels_commit']})", flush=True)
    results = [measure(n, *table[n], args) for n in names]
    md = render(results, args.modes)
    paths = common.write_results(
        "cpu_step", torch.device("cpu"), env, {"results": results}, md, args.out_dir, cpu_results=not args.smoke
    )
    print("\n" + md, flush=True)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
