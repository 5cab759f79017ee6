"""Accuracy and speed table for docs/accounting.md: ``python -m dpkernels.accounting.benchmark``.

Compares both accountants with Google's dp_accounting (if installed) on the test grid
(sigma x q x steps, delta 1e-5 and 1e-6) and times one query each (a fresh accountant:
discretise, compose, answer) and noise calibration, pinned to one CPU core. Prints Markdown.
Cells with q = 1 are also compared with the exact Gaussian-mechanism value.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import platform
import sys
import time
from typing import List, Optional

import numpy as np
import scipy
from scipy.optimize import brentq
from scipy.special import log_ndtr

from .calibration import calibrate_noise_multiplier
from .pld import PLDAccountant
from .rdp import RDPAccountant, _rdp_one

SIGMAS = [0.5, 1.0, 2.0, 4.0]
RATES = [1e-3, 1e-2, 0.1, 1.0]
STEPS = [1, 100, 10_000]
DELTAS = [1e-5, 1e-6]


def _exact_gaussian_epsilon(delta: float, mu: float) -> float:
    def log_delta(e: float) -> float:
        a = log_ndtr(-e / mu + mu / 2)
        b = e + log_ndtr(-e / mu - mu / 2)
        return a + math.log(max(-math.expm1(b - a), 1e-300))

    hi = 1.0
    while log_delta(hi) > math.log(delta):
        hi *= 2
    return brentq(lambda e: log_delta(e) - math.log(delta), 0.0, hi, xtol=1e-13)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpkernels.accounting.benchmark", description=__doc__)
    p.add_argument("--no-dp", action="store_true", help="skip dp_accounting (timings only)")
    args = p.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one CPU core
    dp = None
    if not args.no_dp:
        try:
            import dp_accounting as dp
            from dp_accounting.pld import privacy_loss_distribution as dp_pld

            logging.getLogger("absl").setLevel(logging.ERROR)
        except ImportError:
            print("(dp_accounting not installed: accuracy columns left empty)", file=sys.stderr)
    versions = f"Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}"
    if dp is not None:
        import importlib.metadata as md

        versions += f", dp-accounting {md.version('dp-accounting')}"
    print(
        f"Measured {datetime.date.today().isoformat()} on {_cpu_name()} (one core pinned), "
        f"{platform.system()} {platform.machine()}; {versions}.\n"
    )
    print(
        "| sigma | q | steps | delta | PLD eps (ours) | dp_accounting PLD | rel. diff | exact (q=1) "
        "| RDP eps (ours) | dp_accounting RDP | rel. diff | PLD time (s) | RDP time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst_pld = worst_rdp = 0.0
    max_pld_t = max_rdp_t = 0.0
    for sigma in SIGMAS:
        for q in RATES:
            ref_single = None
            for n in STEPS:
                pld_acc = PLDAccountant().step(sigma, q, n)
                e_pld0, t_pld = _timed(lambda acc=pld_acc: acc.epsilon(DELTAS[0]))
                rdp_acc = RDPAccountant().step(sigma, q, n)
                rdp_acc_fresh = RDPAccountant().step(sigma, q, n)
                _rdp_one.cache_clear()  # time the RDP from scratch
                _, t_rdp = _timed(lambda acc=rdp_acc_fresh: acc.epsilon(DELTAS[0]))
                max_pld_t, max_rdp_t = max(max_pld_t, t_pld), max(max_rdp_t, t_rdp)
                dp_p = dp_r = None
                if dp is not None and not (q == 1.0 and n == 10_000):  # dp takes up to 17 s there
                    h = 1e-6 if (sigma, q) == (4.0, 1e-3) else 1e-4
                    if ref_single is None:
                        ref_single = dp_pld.from_gaussian_mechanism(
                            sigma, sampling_prob=q, value_discretization_interval=h
                        )
                    dp_p = ref_single.self_compose(n)
                    dp_r = dp.rdp.RdpAccountant()
                    dp_r.compose(dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(sigma)), n))
                for delta in DELTAS:
                    e_pld = pld_acc.epsilon(delta)
                    e_rdp = rdp_acc.epsilon(delta)
                    exact = _exact_gaussian_epsilon(delta, math.sqrt(n) / sigma) if q == 1.0 else None
                    cols = [f"{sigma:g}", f"{q:g}", f"{n}", f"{delta:g}", f"{e_pld:.6g}"]
                    if dp_p is not None:
                        ref = dp_p.get_epsilon_for_delta(delta)
                        rel = e_pld / ref - 1
                        worst_pld = max(worst_pld, abs(rel))
                        cols += [f"{ref:.6g}", f"{rel:+.1e}"]
                    else:
                        cols += ["", ""]
                    cols.append("" if exact is None else f"{exact:.6g}")
                    cols.append(f"{e_rdp:.6g}")
                    if dp_r is not None:
                        ref = dp_r.get_epsilon(delta)
                        rel = e_rdp / ref - 1
                        worst_rdp = max(worst_rdp, abs(rel))
                        cols += [f"{ref:.6g}", f"{rel:+.1e}"]
                    else:
                        cols += ["", ""]
                    cols += [f"{t_pld:.2f}", f"{t_rdp:.3f}"] if delta == DELTAS[0] else ["", ""]
                    print("| " + " | ".join(cols) + " |")
                    sys.stdout.flush()
    print(
        f"\nLargest |rel. diff| vs dp_accounting: PLD {worst_pld:.1e}, RDP {worst_rdp:.1e}. "
        f"Slowest single query: PLD {max_pld_t:.2f} s, RDP {max_rdp_t:.3f} s.\n"
    )
    print("| calibration (target eps, delta, q, steps) | accountant | noise multiplier | time (s) |")
    print("|---|---|---|---|")
    for target, delta, q, n in [
        (3.0, 1e-5, 0.01, 1000),
        (1.0, 1e-5, 0.004, 10_000),
        (8.0, 1e-6, 0.1, 10_000),
        (0.5, 1e-5, 1e-3, 10_000),
    ]:
        for name in ("pld", "rdp"):
            sigma, t = _timed(
                lambda args=(target, delta, q, n), name=name: calibrate_noise_multiplier(*args, accountant=name)
            )
            print(f"| {target:g}, {delta:g}, {q:g}, {n} | {name} | {sigma:.4g} | {t:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
