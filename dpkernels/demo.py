"""The main job: DP-SGD on scikit-learn's bundled digits data (no download), end to end.

    python -m dpkernels.demo [--epsilon 3] [--epochs 20] [--device cpu|cuda] [--model mlp|cnn]

Trains the same model (an MLP; or with ``--model cnn`` a small CNN with GroupNorm) twice — non-private and with dpkernels (flat clipping, Poisson sampling,
noise calibrated by the PLD accountant to the target ε at δ = 1e-5) — and prints test accuracy,
the ε actually spent, and the median step time of each, with their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import dpkernels
from dpkernels.accounting import PLDAccountant, calibrate_noise_multiplier
from dpkernels.engine import PoissonSampler


def load_digits_split(device: torch.device, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Digits (1797 8×8 images, 10 classes) scaled to [0, 1], split 80/20 with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise SystemExit("the demo needs scikit-learn: pip install -e .[demo]") from e
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return tuple(t.to(device) for t in (x[train], y[train], x[test], y[test]))


MODELS = {
    "mlp": "MLP 64-256-256-10",
    "cnn": "CNN conv3x3(16)-GroupNorm-conv3x3/2(32)-GroupNorm-linear(10)",
}


def make_model(seed: int, kind: str = "mlp") -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if kind == "cnn":  # the 64 pixels as an 8×8 image; GroupNorm, not BatchNorm (which mixes examples)
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.GroupNorm(8, 32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )
    raise ValueError(f"unknown model {kind!r}; choose one of {sorted(MODELS)}")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return acc


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def train(
    private: bool,
    data: Tuple[torch.Tensor, ...],
    args: argparse.Namespace,
    noise_multiplier: float,
) -> Tuple[float, List[float], float]:
    x_tr, y_tr, x_te, y_te = data
    n = len(x_tr)
    q = args.batch_size / n
    steps = int(args.epochs / q)
    model = make_model(args.seed, args.model).to(x_tr.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    accountant = None
    if private:
        accountant = PLDAccountant()
        model, optimizer = dpkernels.make_private(
            model, optimizer, noise_multiplier=noise_multiplier, max_grad_norm=args.max_grad_norm,
            expected_batch_size=args.batch_size, accountant=accountant, sample_rate=q,
        )
    sampler = PoissonSampler(n, q, steps, generator=torch.Generator().manual_seed(args.seed + 1))
    times: List[float] = []
    for idx in sampler:
        idx = idx.to(x_tr.device)
        if len(idx) == 0:
            if private:
                optimizer.noise_only_step()
            continue

        def one_step() -> None:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            optimizer.step()

        times.append(_timed(one_step, x_tr.device))
    eps = accountant.epsilon(delta=args.delta) if accountant is not None else float("inf")
    return accuracy(model, x_te, y_te), times, eps


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=3.0, help="target ε (δ below)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=128, help="expected (Poisson) batch size")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="mlp", choices=sorted(MODELS))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    data = load_digits_split(device)
    n = len(data[0])
    q = args.batch_size / n
    steps = int(args.epochs / q)
    sigma = calibrate_noise_multiplier(
        target_epsilon=args.epsilon, delta=args.delta, sample_rate=q, steps=steps, accountant="pld"
    )
    print(f"dpkernels {dpkernels.__version__} | device {device} | backends "
          + ", ".join(k for k, v in dpkernels.backends(load_cuda=False).items() if v["available"]))
    print(f"digits: {n} train / {len(data[2])} test examples, {MODELS[args.model]}")
    print(f"DP-SGD: sample rate q={q:.4f} (expected batch {args.batch_size}), {steps} steps, "
          f"clip C={args.max_grad_norm}, noise multiplier σ={sigma:.3f} (calibrated for ε={args.epsilon}, δ={args.delta})")

    acc_np, t_np, _ = train(False, data, args, 0.0)
    acc_dp, t_dp, eps = train(True, data, args, sigma)
    med_np = statistics.median(t_np) * 1e3
    med_dp = statistics.median(t_dp) * 1e3
    print(f"{'':14s}{'test accuracy':>15s}{'ε (δ=' + format(args.delta, 'g') + ')':>14s}{'ms/step':>10s}{'ratio':>8s}")
    print(f"{'non-private':14s}{acc_np:15.3f}{'∞':>14s}{med_np:10.3f}{1.0:8.2f}")
    print(f"{'dpkernels':14s}{acc_dp:15.3f}{eps:14.3f}{med_dp:10.3f}{med_dp / med_np:8.2f}")


if __name__ == "__main__":
    main()
