"""The main job: DP-SGD on scikit-learn's bundled digits data (no download), end to end.

    python -m dpkernels.demo [--epsilon 3] [--epochs 20] [--device cpu|cuda] [--model mlp|cnn|gpt2]

Trains the same model (an MLP; or with ``--model cnn`` a small CNN with GroupNorm) twice —
non-private and with dpkernels (flat clipping, Poisson sampling, noise calibrated by the PLD
accountant to the target ε at δ = 1e-5) — and prints test accuracy, the ε actually spent, and the
median step time of each, with their ratio.

``--model gpt2`` fine-tunes a small randomly initialised byte-level GPT-2 (Hugging Face
transformers) the same two ways on the docstrings of Python's standard library (no download;
``dpkernels.demo_text``) with Adam, and prints held-out perplexity instead of accuracy (and the
untrained model's, about 256: a uniform guess over the bytes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

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
    "gpt2": "GPT-2 (byte level, 2 layers, d=64, 4 heads, untied output layer)",
}

# Per-model defaults of --epochs, --batch-size and --lr (SGD with momentum 0.9 for mlp/cnn,
# Adam for gpt2). gpt2's take about 2 minutes for both runs on a 2-core CPU; there, 8 to 16 epochs
# at batch 64 to 256 all gave a private perplexity of 16-17, and batch 64 the best non-private one.
DEFAULTS: Dict[str, Dict[str, float]] = {
    "mlp": {"epochs": 20.0, "batch_size": 128, "lr": 0.05},
    "cnn": {"epochs": 20.0, "batch_size": 128, "lr": 0.05},
    "gpt2": {"epochs": 12.0, "batch_size": 64, "lr": 3e-3},
}
GPT2_SEQ_LEN = 64  # tokens (bytes) per example


def make_model(seed: int, kind: str = "mlp") -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if kind == "cnn":  # the 64 pixels as an 8×8 image; GroupNorm, not BatchNorm (which mixes examples)
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
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


@dataclass
class Task:
    """What ``train`` needs of a data set and a model family.

    ``loss(model, idx)`` is the mean loss of the training examples ``idx`` (the mean over
    examples that ``make_private``'s ``loss_reduction="mean"`` expects); ``evaluate(model)``
    the held-out metric (test accuracy, or perplexity for gpt2).
    """

    n_train: int
    device: torch.device
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module], float]


def digits_task(data: Tuple[torch.Tensor, ...], args: argparse.Namespace) -> Task:
    """Digits classification with the MLP or CNN, SGD with momentum 0.9, test accuracy."""
    x_tr, y_tr, x_te, y_te = data
    return Task(
        n_train=len(x_tr),
        device=x_tr.device,
        make_model=lambda: make_model(args.seed, args.model).to(x_tr.device),
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        loss=lambda model, idx: F.cross_entropy(model(x_tr[idx]), y_tr[idx]),
        evaluate=lambda model: accuracy(model, x_te, y_te),
    )


def text_task(train_tokens: torch.Tensor, held_out_tokens: torch.Tensor, args: argparse.Namespace) -> Task:
    """Next-byte prediction on standard-library docstrings with GPT-2, Adam, held-out perplexity."""
    from dpkernels import demo_text

    return Task(
        n_train=len(train_tokens),
        device=train_tokens.device,
        make_model=lambda: demo_text.make_gpt2(args.seed, GPT2_SEQ_LEN).to(train_tokens.device),
        make_optimizer=lambda model: torch.optim.Adam(model.parameters(), lr=args.lr),
        loss=lambda model, idx: demo_text.lm_loss(model, train_tokens[idx]),
        evaluate=lambda model: demo_text.perplexity(model, held_out_tokens),
    )


def train(
    private: bool,
    task: Task,
    args: argparse.Namespace,
    noise_multiplier: float,
) -> Tuple[float, List[float], float]:
    """One run of ``args.epochs`` epochs of Poisson-sampled steps; returns (held-out metric,
    step times in seconds, ε spent at ``args.delta``, ∞ for the non-private run)."""
    n = task.n_train
    q = args.batch_size / n
    steps = int(args.epochs / q)
    model = task.make_model()
    optimizer = task.make_optimizer(model)
    accountant = None
    if private:
        accountant = PLDAccountant()
        model, optimizer = dpkernels.make_private(
            model,
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=args.max_grad_norm,
            expected_batch_size=args.batch_size,
            accountant=accountant,
            sample_rate=q,
        )
    sampler = PoissonSampler(n, q, steps, generator=torch.Generator().manual_seed(args.seed + 1))
    times: List[float] = []
    for idx in sampler:
        idx = idx.to(task.device)
        if len(idx) == 0:
            if private:
                optimizer.noise_only_step()
            continue

        def one_step(idx: torch.Tensor = idx) -> None:
            optimizer.zero_grad()
            loss = task.loss(model, idx)
            loss.backward()
            optimizer.step()

        times.append(_timed(one_step, task.device))
    eps = accountant.epsilon(delta=args.delta) if accountant is not None else float("inf")
    return task.evaluate(model), times, eps


def _fill_model_defaults(args: argparse.Namespace) -> None:
    """Give --epochs, --batch-size and --lr not on the command line the model's default."""
    for name, value in DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, type(value)(value))


def _load_task(args: argparse.Namespace, device: torch.device) -> Tuple[Task, str]:
    """The task of ``args.model`` and the line describing its data and model."""
    if args.model != "gpt2":
        data = load_digits_split(device)
        return digits_task(
            data, args
        ), f"digits: {len(data[0])} train / {len(data[2])} test examples, {MODELS[args.model]}"
    from dpkernels import demo_text

    demo_text.require_transformers()
    train_tokens, held_out_tokens = demo_text.load_stdlib_text_split(device, seq_len=GPT2_SEQ_LEN)
    task = text_task(train_tokens, held_out_tokens, args)
    untrained = task.make_model()
    n_params = sum(p.numel() for p in untrained.parameters())
    n_tokens = train_tokens.numel() + held_out_tokens.numel()
    line = (
        f"stdlib docstrings: {len(train_tokens)} train / {len(held_out_tokens)} held-out chunks of "
        f"T={GPT2_SEQ_LEN} bytes ({n_tokens:,} tokens), {MODELS[args.model]}, {n_params:,} parameters\n"
        f"untrained model: held-out perplexity {task.evaluate(untrained):.2f} (uniform over the bytes: 256)"
    )
    return task, line


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=3.0, help="target ε (δ below)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=float, default=None, help="default 20 (gpt2: 12)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="expected (Poisson) batch size; default 128 (gpt2: 64)"
    )
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=None, help="default 0.05 (gpt2: 0.003, Adam)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="mlp", choices=sorted(MODELS))
    args = parser.parse_args(argv)
    _fill_model_defaults(args)

    device = torch.device(args.device)
    task, data_line = _load_task(args, device)
    n = task.n_train
    q = args.batch_size / n
    steps = int(args.epochs / q)
    sigma = calibrate_noise_multiplier(
        target_epsilon=args.epsilon, delta=args.delta, sample_rate=q, steps=steps, accountant="pld"
    )
    print(
        f"dpkernels {dpkernels.__version__} | device {device} | backends "
        + ", ".join(k for k, v in dpkernels.backends(load_cuda=False).items() if v["available"])
    )
    print(data_line)
    print(
        f"DP-SGD: sample rate q={q:.4f} (expected batch {args.batch_size}), {steps} steps, "
        f"clip C={args.max_grad_norm}, noise multiplier σ={sigma:.3f} (calibrated for ε={args.epsilon}, δ={args.delta})"
    )

    metric_np, t_np, _ = train(False, task, args, 0.0)
    metric_dp, t_dp, eps = train(True, task, args, sigma)
    med_np = statistics.median(t_np) * 1e3
    med_dp = statistics.median(t_dp) * 1e3
    metric_name = "perplexity" if args.model == "gpt2" else "test accuracy"
    print(f"{'':14s}{metric_name:>15s}{'ε (δ=' + format(args.delta, 'g') + ')':>14s}{'ms/step':>10s}{'ratio':>8s}")
    print(f"{'non-private':14s}{metric_np:15.3f}{'∞':>14s}{med_np:10.3f}{1.0:8.2f}")
    print(f"{'dpkernels':14s}{metric_dp:15.3f}{eps:14.3f}{med_dp:10.3f}{med_dp / med_np:8.2f}")


if __name__ == "__main__":
    main()
