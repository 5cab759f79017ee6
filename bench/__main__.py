"""Run every benchmark in one command: ``python -m bench`` (GPU) or ``python -m bench --smoke`` (CPU).

Order: full-step benchmark (the headline numbers first), floor (which reads the step results
just written), linear-op micro-benchmark, embedding and norm-layer micro-benchmark, the tied
embedding's cross term. Each script gets its own time budget so the whole run fits one device call
(10 minutes): a configuration that would start after its script's budget is skipped and listed
as skipped. A script that fails does not stop the others; the exit status is non-zero if any did.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

# the smoke run uses the Triton kernels under the interpreter unless told otherwise; this must be
# set before dpkernels (and so triton.jit) is imported
if "--smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import bench_layer_ops, bench_linear_ops, bench_step, bench_tied, common, floor  # noqa: E402

# seconds after which each script starts no new configuration (GPU run); the sum plus the
# overrun of the last configuration and start-up must stay under the device call's 600 s
BUDGETS = {"step": 200.0, "linear_ops": 150.0, "layer_ops": 90.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, results to /tmp")
    ap.add_argument("--out-dir", default=None, help="result folder (default bench/results/ on a GPU, /tmp on CPU)")
    scripts = ["step", "floor", "linear_ops", "layer_ops", "tied"]
    ap.add_argument("--only", nargs="+", choices=scripts, default=scripts)
    ap.add_argument("--no-budget", action="store_true", help="run every configuration whatever the time")
    args = ap.parse_args()

    common_args = (["--smoke"] if args.smoke else []) + (["--out-dir", args.out_dir] if args.out_dir else [])

    def budget(name: str) -> list:
        if args.smoke or args.no_budget or name not in BUDGETS:
            return []
        return ["--budget-s", str(BUDGETS[name])]

    runs = {
        "linear_ops": lambda: bench_linear_ops.main(common_args + budget("linear_ops")),
        "step": lambda: bench_step.main(common_args + budget("step")),
        "floor": lambda: floor.main(common_args),
        "layer_ops": lambda: bench_layer_ops.main(common_args + budget("layer_ops")),
        "tied": lambda: bench_tied.main(common_args),
    }
    failed = []
    t_all = time.perf_counter()
    for name in args.only:
        t0 = time.perf_counter()
        print(f"\n========== {name} ==========", flush=True)
        try:
            rc = runs[name]()
        except SystemExit as e:  # argparse, or a script refusing to run (no GPU)
            if isinstance(e.code, str):
                print(e.code, flush=True)
                rc = 1
            else:
                rc = e.code or 0
        except Exception:
            traceback.print_exc()
            rc = 1
        print(
            f"========== {name}: {'ok' if not rc else 'FAILED'} in {time.perf_counter() - t0:.0f} s ==========",
            flush=True,
        )
        if rc:
            failed.append(name)
        common.release(
            common.torch.device("cuda")
            if common.torch.cuda.is_available() and not args.smoke
            else common.torch.device("cpu")
        )
    print(
        f"\nall done in {time.perf_counter() - t_all:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
