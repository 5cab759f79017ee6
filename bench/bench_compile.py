"""torch.compile of the private step on the CPU (inductor): eager against compiled, private against not.

Four modes per workload, each on a freshly built model with the same initial weights and batch:

    eager            non-private: loss.backward(); optimizer.step()                  (= 1.00)
    compiled         the same with torch.compile(model)
    dp_eager         dpkernels.make_private (flat clipping, σ = 1), eager
    dp_compiled      the same with torch.compile(model) after make_private; DPOptimizer.step
                     itself always runs eagerly

The optimizer's step (SGD) is eager in every mode, so the modes differ only in the model's forward
and backward. Workloads: the README demo's MLP 64-256-256-10 (B = 128) and a small GPT (bench/models.py,
vocabulary 512, T = 64, d = 128, 2 layers, 4 heads, MLP 512, B = 16) with its embeddings and LayerNorms
trained. The private modes take one eager, noise-free step first (the guard's probe runs there, as
in training); their next step, also noise-free, is the first timed one and the compiled private
gradient is compared with the eager one there (they must agree to float32 rounding).

Compile times are measured with inductor's caches off (``force_disable_caches``), as on a first run.

Timing: the first steps of each mode (``--warmup``) are not timed; the time the first compiled step
took beyond a warm compiled step (tracing and inductor's code generation) is reported as the compile
time.
Then ``--rounds`` interleaved rounds (each mode runs ``--steps`` steps in every round, the modes in turn,
so that drift hits all alike); per round the median step time of each mode, and the median over rounds
of its ratio to eager non-private and to compiled non-private of the same round.

    python bench/bench_compile.py              # bench/results/compile_step-CPU-<date>.{md,json}
    python bench/bench_compile.py --smoke      # tiny settings, /tmp
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch._inductor.config

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, models  # noqa: E402

MODES = ["eager", "compiled", "dp_eager", "dp_compiled"]
WORKLOADS = {
    "mlp": ("demo", models.DemoConfig("mlp", batch=128)),
    "gpt": (
        "gpt",
        models.GPTConfig(vocab=512, seq=64, d_model=128, n_layer=2, n_head=4, d_mlp=512, batch=16, train_all=True),
    ),
}
SMOKE = {
    "mlp": ("demo", models.DemoConfig("mlp", batch=8)),
    "gpt": (
        "gpt",
        models.GPTConfig(vocab=64, seq=8, d_model=16, n_layer=1, n_head=2, d_mlp=32, batch=4, train_all=True),
    ),
}
SIGMA, CLIP = 1.0, 1.0


def build(mode: str, kind: str, cfg: Any, seed: int) -> Tuple[Callable[[], None], Callable[[bool], None], Any]:
    """(one training step, a switch of the noise (private modes), the model) for ``mode``."""
    import dpkernels

    device = torch.device("cpu")
    model = models.build(kind, cfg, seed=seed, device=device, dtype=torch.float32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = models.make_batch(kind, cfg, seed=seed + 1, device=device, dtype=torch.float32)
    private = mode.startswith("dp_")
    if private:
        model, opt = dpkernels.make_private(
            model, opt, noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=cfg.batch, seed=seed + 7
        )
    state = {"run": model}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        models.lm_loss(state["run"](x), y).backward()
        opt.step()

    def set_noise(on: bool) -> None:
        if private:
            opt.noise_multiplier = SIGMA if on else 0.0

    if private:  # a first eager step, noise-free: the guard's probe (eager Python, before any graph exists)
        set_noise(False)
        step()
    if mode.endswith("compiled"):
        state["run"] = torch.compile(model)
    return step, set_noise, model


def _timed(step: Callable[[], None], n: int) -> List[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def measure(name: str, kind: str, cfg: Any, args: argparse.Namespace) -> Dict[str, Any]:
    torch._dynamo.reset()
    out: Dict[str, Any] = {"workload": name, "describe": cfg.describe(), "modes": {}}
    built: Dict[str, Callable[[], None]] = {}
    grads: Dict[str, Dict[str, torch.Tensor]] = {}
    for mode in MODES:
        res: Dict[str, Any] = {}
        step, set_noise, model = build(mode, kind, cfg, args.seed)
        set_noise(False)
        first = _timed(step, 1)[0]  # compiled modes: tracing and code generation happen here
        if mode.startswith("dp_"):
            grads[mode] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        set_noise(True)
        warm = _timed(step, args.warmup)
        res["first_step_s"] = first
        res["warm_step_ms"] = 1e3 * statistics.median(warm) if warm else None
        built[mode] = step
        out["modes"][mode] = res
    for mode in ("compiled", "dp_compiled"):
        res = out["modes"][mode]
        res["compile_s"] = res["first_step_s"] - (res["warm_step_ms"] or 0.0) / 1e3
    out["dp_compiled_vs_eager_grad_rel_err"] = max(
        float((grads["dp_compiled"][n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
        for n, g in grads["dp_eager"].items()
    )
    rounds: Dict[str, List[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            rounds[mode].append(statistics.median(_timed(built[mode], args.steps)))
    for mode in MODES:
        res = out["modes"][mode]
        res["median_ms"] = 1e3 * statistics.median(rounds[mode])
        res["vs_eager"] = statistics.median(t / b for t, b in zip(rounds[mode], rounds["eager"]))
        res["vs_compiled"] = statistics.median(t / b for t, b in zip(rounds[mode], rounds["compiled"]))
    out["dp_compiled_vs_dp_eager"] = statistics.median(t / b for t, b in zip(rounds["dp_compiled"], rounds["dp_eager"]))
    print(
        f"- {name}: "
        + ", ".join(f"{m} {out['modes'][m]['vs_eager']:.2f}" for m in MODES)
        + f" (x eager non-private); private compiled / private eager {out['dp_compiled_vs_dp_eager']:.2f}",
        flush=True,
    )
    return out


def render(results: List[Dict[str, Any]]) -> str:
    rows = [
        [f"{r['workload']}: {r['describe']}"]
        + [f"{r['modes'][m]['vs_eager']:.2f}" for m in MODES]
        + [f"{r['dp_compiled_vs_dp_eager']:.2f}"]
        for r in results
    ]
    parts = [
        "## Step time / eager non-private (median over interleaved rounds)\n",
        common.md_table(["workload"] + MODES + ["dp_compiled / dp_eager"], rows),
        "\n## Step time / compiled non-private\n",
        common.md_table(
            ["workload"] + MODES,
            [[r["workload"]] + [f"{r['modes'][m]['vs_compiled']:.2f}" for m in MODES] for r in results],
        ),
        "\n## Absolute step times (ms, median of the rounds' medians)\n",
        common.md_table(
            ["workload"] + MODES,
            [[r["workload"]] + [f"{r['modes'][m]['median_ms']:.3f}" for m in MODES] for r in results],
        ),
        "\n## Compile time (s: the first compiled step beyond a warm one; inductor's caches off) and the "
        "compiled private gradient against the eager one (noise-free step, max relative difference)\n",
        common.md_table(
            ["workload", "compiled", "dp_compiled", "dp gradient rel. err."],
            [
                [
                    r["workload"],
                    f"{r['modes']['compiled']['compile_s']:.1f}",
                    f"{r['modes']['dp_compiled']['compile_s']:.1f}",
                    f"{r['dp_compiled_vs_eager_grad_rel_err']:.1e}",
                ]
                for r in results
            ],
        ),
    ]
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--workloads", nargs="+", default=None, choices=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode per round")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after the first")
    args = ap.parse_args(argv)
    table = SMOKE if args.smoke else WORKLOADS
    torch._inductor.config.force_disable_caches = True  # the compile time of a first run, not a cache hit
    torch.compile(lambda t: t * 2)(torch.ones(2))  # inductor's one-time start-up, out of every mode's compile time
    args.rounds = args.rounds or (2 if args.smoke else 7)
    args.steps = args.steps or (2 if args.smoke else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    env = common.env_record(
        torch.device("cpu"),
        script="bench_compile",
        smoke=args.smoke,
        threads=torch.get_num_threads(),
        sigma=SIGMA,
        max_grad_norm=CLIP,
        **({} if args.smoke else {"device_tag": "CPU"}),
    )
    print(f"# torch.compile of the private step on {env['device']} (commit {env['dpkernels_commit']})", flush=True)
    results = [measure(n, *table[n], args) for n in (args.workloads or list(table))]
    md = render(results)
    paths = common.write_results(
        "compile_step", torch.device("cpu"), env, {"results": results}, md, args.out_dir, cpu_results=not args.smoke
    )
    print("\n" + md, flush=True)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
