"""Command line: ``python -m dpkernels.accounting``.

python -m dpkernels.accounting --noise-multiplier 1.1 --sample-rate 0.004 --steps 10000 --delta 1e-5
    prints epsilon from each accountant (the PLD one is the tight number to report);
python -m dpkernels.accounting --target-epsilon 3 --sample-rate 0.004 --steps 10000 --delta 1e-5
    prints the smallest noise multiplier that meets the target, for each accountant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

from .calibration import NOISE_RANGE, calibrate_noise_multiplier, steps_for_epochs
from .pld import PLDAccountant
from .rdp import RDPAccountant

_ACCOUNTANTS = {"pld": PLDAccountant, "rdp": RDPAccountant}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpkernels.accounting",
        description="Privacy accounting for DP-SGD (Poisson-subsampled Gaussian, add/remove-one adjacency).",
    )
    p.add_argument(
        "--noise-multiplier", "-s", type=float, help="noise std / clipping norm (omit with --target-epsilon)"
    )
    p.add_argument("--sample-rate", "-q", type=float, required=True, help="Poisson sampling probability per step")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--steps", "-n", type=int, help="number of steps")
    g.add_argument("--epochs", type=float, help="number of epochs (steps = ceil(epochs / sample_rate))")
    p.add_argument("--delta", "-d", type=float, default=1e-5, help="target delta (default 1e-5)")
    p.add_argument("--epsilon", type=float, help="also print delta at this epsilon")
    p.add_argument("--target-epsilon", type=float, help="calibrate: print the smallest noise multiplier meeting it")
    p.add_argument(
        "--accountant", choices=["pld", "rdp", "both"], default="both", help="which accountant(s) to run (default both)"
    )
    p.add_argument(
        "--noise-range",
        type=float,
        nargs=2,
        default=NOISE_RANGE,
        metavar=("LOW", "HIGH"),
        help=f"calibration search range for the noise multiplier (default {NOISE_RANGE[0]:g} {NOISE_RANGE[1]:g})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    names = ["pld", "rdp"] if args.accountant == "both" else [args.accountant]
    try:
        steps = args.steps if args.steps is not None else steps_for_epochs(args.epochs, args.sample_rate)
        out = {"sample_rate": args.sample_rate, "steps": steps, "delta": args.delta}
        lines = []
        if args.target_epsilon is not None:
            if args.noise_multiplier is not None:
                raise ValueError("give either --noise-multiplier (to get epsilon) or --target-epsilon (to get it)")
            out["target_epsilon"] = args.target_epsilon
            for name in names:
                t0 = time.perf_counter()
                sigma = calibrate_noise_multiplier(
                    args.target_epsilon,
                    args.delta,
                    args.sample_rate,
                    steps,
                    accountant=name,
                    noise_range=tuple(args.noise_range),
                )
                out[f"{name}_noise_multiplier"] = sigma
                lines.append(
                    f"{name.upper()} noise multiplier: {sigma:.4g}   "
                    f"(smallest meeting epsilon <= {args.target_epsilon:g} at delta = {args.delta:g}; "
                    f"{time.perf_counter() - t0:.2f} s)"
                )
        else:
            if args.noise_multiplier is None:
                raise ValueError("give --noise-multiplier (to get epsilon) or --target-epsilon (to calibrate)")
            out["noise_multiplier"] = args.noise_multiplier
            for name in names:
                acc = _ACCOUNTANTS[name]()
                acc.step(args.noise_multiplier, args.sample_rate, steps)
                t0 = time.perf_counter()
                eps = acc.epsilon(args.delta)
                out[f"{name}_epsilon"] = eps
                note = "pessimistic, tight" if name == "pld" else "upper bound"
                seconds = time.perf_counter() - t0
                line = f"{name.upper()} epsilon: {eps:.4f}   (delta = {args.delta:g}; {note}; {seconds:.2f} s)"
                if args.epsilon is not None:
                    d = acc.delta(args.epsilon)
                    out[f"{name}_delta"] = d
                    line += f"\n{name.upper()} delta at epsilon = {args.epsilon:g}: {d:.4g}"
                lines.append(line)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"DP-SGD, Poisson sampling q = {args.sample_rate:g}, {steps} steps, add/remove-one adjacency"
            + (f", noise multiplier {args.noise_multiplier:g}" if args.noise_multiplier is not None else "")
        )
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
