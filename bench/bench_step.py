"""Full training step: non-private vs naive DP-SGD vs Opacus (hooks, ghost) vs dpkernels.

Models (bench/models.py):
    stack   8 x Linear(1024,1024) + ReLU, B=256, T=1; and the sequence variant B=32, T=256
    gpt     d=768, 12 layers, 12 heads, MLP 3072, vocab 50257, T=256, B=32 (embeddings and
            LayerNorms frozen; every trainable parameter is in an nn.Linear)
    gpt_all the same GPT with the embeddings and LayerNorms trained too
    gpt_tied gpt_all with the head's weight tied to the token embedding (GPT-2's LM head; Opacus
            refuses tied parameters, so its modes report that)

Modes, all in one process, each on a freshly built model with the same initial weights:
    non_private    loss.backward(); optimizer.step()
    naive          torch.func vmap(grad) per-example gradients, flat clip, Gaussian noise
    opacus_hooks   Opacus PrivacyEngine.make_private(grad_sample_mode="hooks")
    opacus_ghost   Opacus PrivacyEngine.make_private(grad_sample_mode="ghost") (ghost clipping,
                   two backward passes packaged in the returned criterion's loss.backward())
    opacus_ghost_fused  the same with its nn.Linear norms from dpkernels' fused kernels
                   (dpkernels.integrations.opacus.use_fused_norms)
    dpkernels      dpkernels.make_private (one backward, fused norms and clipped sum)
Every private mode does flat clipping at C = --max-grad-norm with noise multiplier --sigma.

Reported: ms/step (median over >= 20 timed steps after >= 5 warm-up, CUDA events around each
step: zero_grad, forward, loss, backward, optimizer step), peak memory allocated during the
steps, both also as ratios to non-private. A mode that runs out of memory reports "OOM";
one that fails otherwise reports "failed: <reason>" and the benchmark goes on.

``--check`` (on by default with --smoke): the first step of each private mode runs with zero
noise and its gradient is compared with an independent per-example loop (one backward per
example, clip, sum): all engines must compute the same clipped gradient.

    python bench/bench_step.py                       # GPU
    TRITON_INTERPRET=1 python bench/bench_step.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench import common, models  # noqa: E402
from bench.common import fmt_bytes, md_table  # noqa: E402

# noise that says nothing about speed: Opacus' secure-RNG notice, the full-backward-hook notice
# of its ghost mode, torch.func's "no batching rule" notice for SDPA (the naive mode then loops
# over the batch inside vmap for attention, which is part of what "naive" costs)
for _msg in ("Secure RNG turned off", "Full backward hook is firing", "There is a performance drop"):
    warnings.filterwarnings("ignore", message=_msg)

MODES = ["non_private", "naive", "opacus_hooks", "opacus_ghost", "opacus_ghost_fused", "dpkernels"]
PRIVATE = [m for m in MODES if m != "non_private"]

WORKLOADS = {
    "gpt": ("gpt", models.GPTConfig()),
    "stack_T1": ("stack", models.StackConfig(width=1024, depth=8, batch=256, seq=1)),
    "stack_T256": ("stack", models.StackConfig(width=1024, depth=8, batch=32, seq=256)),
    "gpt_all": ("gpt", models.GPTConfig(train_all=True)),  # last: the workloads come first in a budget
    "gpt_tied": ("gpt", models.GPTConfig(train_all=True, tied=True)),
}
SMOKE_WORKLOADS = {
    "gpt": ("gpt", models.GPTConfig(vocab=97, seq=8, d_model=32, n_layer=2, n_head=2, d_mlp=64, batch=4)),
    "gpt_all": (
        "gpt",
        models.GPTConfig(vocab=97, seq=8, d_model=32, n_layer=2, n_head=2, d_mlp=64, batch=4, train_all=True),
    ),
    "gpt_tied": (
        "gpt",
        models.GPTConfig(
            vocab=97, seq=8, d_model=32, n_layer=2, n_head=2, d_mlp=64, batch=4, train_all=True, tied=True
        ),
    ),
    "stack_T1": ("stack", models.StackConfig(width=32, depth=3, batch=8, seq=1)),
    "stack_T256": ("stack", models.StackConfig(width=32, depth=3, batch=4, seq=6)),
}
DTYPE_CHOICES = ["float32", "bfloat16", "autocast-bf16"]


class Workload:
    def __init__(self, name: str, kind: str, cfg, device: torch.device, dtype_opt: str, args) -> None:
        self.name, self.kind, self.cfg, self.device = name, kind, cfg, device
        self.dtype_opt = dtype_opt
        self.param_dtype = torch.bfloat16 if dtype_opt == "bfloat16" else torch.float32
        self.autocast = dtype_opt == "autocast-bf16"
        self.args = args
        self.B = cfg.batch

    def model(self) -> nn.Module:
        return models.build(self.kind, self.cfg, seed=self.args.seed, device=self.device, dtype=self.param_dtype)

    def batch(self):
        return models.make_batch(
            self.kind, self.cfg, seed=self.args.seed + 1, device=self.device, dtype=self.param_dtype
        )

    def amp(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def optimizer(self, params) -> torch.optim.Optimizer:
        params = [p for p in params if p.requires_grad]
        if self.args.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        return torch.optim.SGD(params, lr=1e-3)


# ------------------------------------------------------------------ modes ------------------
# Each builder returns (step, set_noise, keep) where step() runs one full training step,
# set_noise(on) switches the noise on/off (for the zero-noise check) and keep holds objects
# that must stay alive.


def build_non_private(w: Workload):
    model = w.model()
    opt = w.optimizer(model.parameters())
    x, y = w.batch()

    def step():
        opt.zero_grad(set_to_none=True)
        with w.amp():
            loss = models.lm_loss(model(x), y)
        loss.backward()
        opt.step()

    return step, None, (model, opt, x, y), model


def build_naive(w: Workload):
    from torch.func import functional_call, grad, vmap

    model = w.model()
    opt = w.optimizer(model.parameters())
    x, y = w.batch()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))
    C, B = w.args.max_grad_norm, w.B
    noise = {"sigma": w.args.sigma}

    def loss_one(params, xi, yi):
        with w.amp():
            out = functional_call(model, (params, frozen), (xi.unsqueeze(0),))
            return models.lm_loss(out, yi.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step():
        opt.zero_grad(set_to_none=True)
        g = per_example({n: p.detach() for n, p in trainable.items()}, x, y)
        sq = torch.zeros(B, device=x.device, dtype=torch.float32)
        for gi in g.values():
            sq += gi.reshape(B, -1).float().square().sum(dim=1)
        c = (C / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for n, p in trainable.items():
            gi = g[n]
            s = torch.tensordot(c.to(gi.dtype), gi, dims=1)
            if noise["sigma"]:
                s = s + noise["sigma"] * C * torch.randn_like(s)
            p.grad = (s / B).to(p.dtype)
        del g
        opt.step()

    def set_noise(on: bool):
        noise["sigma"] = w.args.sigma if on else 0.0

    return step, set_noise, (model, opt, x, y), model


def _opacus_common(w: Workload, mode: str):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = w.model()
    opt = w.optimizer(model.parameters())
    x, y = w.batch()
    # make_private wants a data loader; one batch of the right size gives sample rate 1 and
    # expected batch size B. Batches are fed directly (fixed B: poisson_sampling=False).
    loader = DataLoader(TensorDataset(x, y), batch_size=w.B)
    engine = PrivacyEngine()
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=w.args.sigma,
            max_grad_norm=w.args.max_grad_norm,
            poisson_sampling=False,
            loss_reduction="mean",
            clipping="flat",
            grad_sample_mode=mode,
        )
    return out, x, y, engine


def _opacus_set_noise(w: Workload, dp_opt):
    def set_noise(on: bool):
        dp_opt.noise_multiplier = w.args.sigma if on else 0.0

    return set_noise


def build_opacus_hooks(w: Workload):
    (gs_model, dp_opt, _loader), x, y, engine = _opacus_common(w, "hooks")

    def step():
        dp_opt.zero_grad(set_to_none=True)
        with w.amp():
            loss = models.lm_loss(gs_model(x), y)
        loss.backward()
        dp_opt.step()

    return step, _opacus_set_noise(w, dp_opt), (gs_model, dp_opt, engine, x, y), gs_model


def build_opacus_ghost(w: Workload):
    (gs_model, dp_opt, dp_criterion, _loader), x, y, engine = _opacus_common(w, "ghost")

    def step():
        dp_opt.zero_grad(set_to_none=True)
        with w.amp():
            logits = gs_model(x)
            V = logits.shape[-1]
            if logits.dim() == 3:
                # per-example loss = mean over the example's tokens (shape= tells Opacus the B x T layout)
                loss = dp_criterion(logits.reshape(-1, V).float(), y.reshape(-1), shape=logits.shape)
            else:
                loss = dp_criterion(logits.float(), y)
        loss.backward()
        dp_opt.step()

    return step, _opacus_set_noise(w, dp_opt), (gs_model, dp_opt, dp_criterion, engine, x, y), gs_model


def build_opacus_ghost_fused(w: Workload):
    """Opacus ghost clipping with its nn.Linear norms computed by dpkernels' fused kernels
    (dpkernels.integrations.opacus); switched on only around this mode's own steps."""
    import dpkernels.integrations.opacus as dpk_opacus

    ghost_step, set_noise, keep, model = build_opacus_ghost(w)

    def step():
        dpk_opacus.use_fused_norms(backend=w.args.dp_backend)
        try:
            ghost_step()
        finally:
            dpk_opacus.restore_opacus_norms()

    return step, set_noise, keep, model


def build_dpkernels(w: Workload):
    import dpkernels

    model = w.model()
    opt = w.optimizer(model.parameters())
    x, y = w.batch()
    model, dp_opt = dpkernels.make_private(
        model,
        opt,
        noise_multiplier=w.args.sigma,
        max_grad_norm=w.args.max_grad_norm,
        expected_batch_size=w.B,
        loss_reduction="mean",
        seed=w.args.seed + 7,
        norm_method=w.args.norm_method,
        backend=w.args.dp_backend,
        clipping=getattr(w.args, "clipping", "flat"),
    )

    def step():
        dp_opt.zero_grad(set_to_none=True)
        with w.amp():
            loss = models.lm_loss(model(x), y)
        loss.backward()
        dp_opt.step()

    def set_noise(on: bool):
        dp_opt.noise_multiplier = w.args.sigma if on else 0.0

    return step, set_noise, (model, dp_opt, x, y), model


BUILDERS: Dict[str, Callable] = {
    "non_private": build_non_private,
    "naive": build_naive,
    "opacus_hooks": build_opacus_hooks,
    "opacus_ghost": build_opacus_ghost,
    "opacus_ghost_fused": build_opacus_ghost_fused,
    "dpkernels": build_dpkernels,
}


# ------------------------------------------------------------------ reference gradient -----


def trainable_params(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Opacus' GradSampleModule prefixes names with "_module."; strip it to line names up
    return [(n.removeprefix("_module."), p) for n, p in named]


def reference_clipped_grad(w: Workload) -> Dict[str, torch.Tensor]:
    """(Σ_i clip_C(g_i)) / B from one backward per example (no vmap, no engine)."""
    model = w.model()
    x, y = w.batch()
    params = trainable_params(model)
    C, B = w.args.max_grad_norm, w.B
    sq = []
    for i in range(B):
        with w.amp():
            loss = models.lm_loss(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [p for _, p in params])
        sq.append(sum(g.float().square().sum() for g in grads))
    c = (C / (torch.stack(sq).sqrt() + 1e-6)).clamp(max=1.0)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    for i in range(B):
        with w.amp():
            loss = models.lm_loss(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [p for _, p in params])
        for (n, _), g in zip(params, grads):
            acc[n] += c[i] * g.float()
    return {n: v / B for n, v in acc.items()}


def grad_rel_err(model: nn.Module, ref: Dict[str, torch.Tensor]) -> Optional[float]:
    num = den = 0.0
    for n, p in trainable_params(model):
        if p.grad is None or n not in ref:
            return None
        num += float((p.grad.float() - ref[n]).square().sum())
        den += float(ref[n].square().sum())
    return (num / den) ** 0.5 if den > 0 else None


# ------------------------------------------------------------------ one mode ---------------


def _measure(w: Workload, mode: str, ref: Optional[Dict[str, torch.Tensor]], res: Dict[str, Any]) -> None:
    """Build, check and time one mode; every tensor it made dies with this frame."""
    device = w.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step, set_noise, _keep, model = BUILDERS[mode](w)
    if device.type == "cuda":
        res["built_bytes"] = torch.cuda.memory_allocated(device)
    if ref is not None and set_noise is not None:
        set_noise(False)
        step()
        res["grad_rel_err_vs_loop"] = grad_rel_err(model, ref)
        set_noise(True)
    on_warm = (lambda: torch.cuda.reset_peak_memory_stats(device)) if device.type == "cuda" else None
    t = common.time_fn(step, device, warmup=w.args.warmup, reps=w.args.steps, flush_l2=False, on_warm=on_warm)
    res.update(t)
    if device.type == "cuda":
        res["peak_bytes"] = torch.cuda.max_memory_allocated(device)


def run_mode(w: Workload, mode: str, ref: Optional[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
    res: Dict[str, Any] = {"mode": mode}
    common.release(w.device)
    status = "ok"
    try:
        _measure(w, mode, ref, res)
    except Exception as e:  # one mode's failure must not end the benchmark
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        status = "OOM" if common.is_oom(e) else f"failed: {type(e).__name__}: {first}"
        e.__traceback__ = None  # drop the frames (and the tensors they hold) before releasing
    res["status"] = status
    common.release(w.device)
    return res


def run_workload(name: str, kind: str, cfg, dtype_opt: str, device: torch.device, args) -> Dict[str, Any]:
    w = Workload(name, kind, cfg, device, dtype_opt, args)
    out: Dict[str, Any] = {
        "workload": name,
        "kind": kind,
        "config": models.config_dict(cfg),
        "describe": cfg.describe(),
        "dtype": dtype_opt,
        "modes": [],
    }
    ref = None
    if args.check and args.clipping == "flat":  # the reference loop clips flat, as the other engines do
        try:
            t0 = time.perf_counter()
            ref = reference_clipped_grad(w)
            out["reference_s"] = time.perf_counter() - t0
        except Exception as e:
            out["reference"] = f"failed: {type(e).__name__}: {e}"
            e.__traceback__ = None
        common.release(device)
    print(f"- {name} [{dtype_opt}]: {cfg.describe()}", flush=True)
    for mode in args.modes:
        r = run_mode(w, mode, ref)
        out["modes"].append(r)
        if r["status"] == "ok":
            err = r.get("grad_rel_err_vs_loop")
            print(
                f"    {mode:<13} {r['median_ms']:10.3f} ms/step  peak {fmt_bytes(r.get('peak_bytes')):>11}"
                + (f"  grad err vs loop {err:.1e}" if err is not None else ""),
                flush=True,
            )
        else:
            print(f"    {mode:<13} {r['status']}", flush=True)
    del ref
    common.release(device)
    base = next((r for r in out["modes"] if r["mode"] == "non_private" and r["status"] == "ok"), None)
    for r in out["modes"]:
        if base and r["status"] == "ok":
            r["time_ratio"] = r["median_ms"] / base["median_ms"]
            if r.get("peak_bytes") and base.get("peak_bytes"):
                r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
    return out


# ------------------------------------------------------------------ report -----------------


def render(results: List[Dict[str, Any]], args) -> str:
    parts = [
        f"Flat clipping C={args.max_grad_norm}, noise multiplier σ={args.sigma}, optimizer {args.optimizer}, "
        f"dpkernels backend {args.dp_backend or 'auto'}, norm method {args.norm_method}, dpkernels clipping "
        f"{args.clipping}. ms/step: median over "
        f"{args.steps} timed steps after {args.warmup} warm-up ({args.clock} around each whole step). "
        "Peak: max memory allocated during the timed steps (steady state after warm-up, so Triton's "
        "autotuning is not counted; parameters, optimizer state, batch and activations included). "
        "Ratios are to non-private on the same model and dtype. "
        "'grad err': relative L2 error of the first step's zero-noise gradient against a per-example "
        "loop (one backward per example).\n"
    ]
    for res in results:
        parts.append(f"### {res['workload']} — {res['describe']} — {res['dtype']}\n")
        if isinstance(res.get("reference"), str):
            parts.append(f"(reference gradient {res['reference']})\n")
        rows = []
        for r in res["modes"]:
            err = r.get("grad_rel_err_vs_loop")
            rows.append(
                [
                    r["mode"],
                    r.get("median_ms"),
                    r.get("time_ratio"),
                    fmt_bytes(r.get("peak_bytes")),
                    r.get("memory_ratio"),
                    f"{err:.1e}" if isinstance(err, float) else "–",
                    r["status"],
                ]
            )
        parts.append(
            md_table(
                ["mode", "ms/step", "time / non-private", "peak memory", "memory / non-private", "grad err", "status"],
                rows,
            )
        )
        parts.append("")
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument(
        "--dtype",
        nargs="+",
        default=None,
        choices=DTYPE_CHOICES,
        help="float32, bfloat16 (pure-bf16 model) or autocast-bf16 (default: float32 bfloat16; smoke: float32)",
    )
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--sigma", type=float, default=1.0, help="noise multiplier")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--norm-method", default="auto", choices=["auto", "ghost", "direct"])
    ap.add_argument(
        "--clipping",
        default="flat",
        choices=["flat", "automatic", "per_layer"],
        help="dpkernels clipping style (the other engines always clip flat)",
    )
    ap.add_argument(
        "--dp-backend",
        default=None,
        help="dpkernels backend (default auto; smoke: triton under TRITON_INTERPRET=1, else torch)",
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps (>= 20 on a GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (>= 5 on a GPU)")
    ap.add_argument(
        "--check",
        dest="check",
        action="store_true",
        default=None,
        help="compare each private mode's zero-noise gradient with a per-example loop",
    )
    ap.add_argument("--no-check", dest="check", action="store_false")
    args = ap.parse_args(argv)

    device = common.pick_device(args.smoke)
    if args.smoke:
        workloads = SMOKE_WORKLOADS
        dtypes = args.dtype or ["float32"]
        args.steps = args.steps or 3
        args.warmup = args.warmup or 1
        args.dp_backend = args.dp_backend or common.smoke_dp_backend()
        args.check = True if args.check is None else args.check
    else:
        workloads = WORKLOADS
        dtypes = args.dtype or ["float32", "bfloat16"]
        args.steps = max(20, args.steps or 20)
        args.warmup = max(5, args.warmup or 5)
        args.check = False if args.check is None else args.check
    budget = common.Budget(args.budget_s)
    args.clock = "CUDA events" if device.type == "cuda" else "time.perf_counter"

    if importlib.util.find_spec("opacus") is None:  # the Opacus modes will then report "failed: ..."
        print("note: opacus is not installed; see bench/README.md for carrying the wheel", flush=True)
    env = common.env_record(
        device,
        script="bench_step",
        dp_backend=args.dp_backend or "auto",
        optimizer=args.optimizer,
        sigma=args.sigma,
        max_grad_norm=args.max_grad_norm,
        smoke=args.smoke,
    )
    print(f"# full step on {env['device']} (commit {env['dpkernels_commit']})", flush=True)

    results = []
    for dtype_opt in dtypes:
        for name in args.workloads:
            kind, cfg = workloads[name]
            if budget.exhausted():
                print(f"- {name} [{dtype_opt}]: skipped, time budget of {args.budget_s:.0f} s spent", flush=True)
                results.append(
                    {
                        "workload": name,
                        "kind": kind,
                        "config": models.config_dict(cfg),
                        "describe": cfg.describe(),
                        "dtype": dtype_opt,
                        "modes": [{"mode": m, "status": "skipped: time budget spent"} for m in args.modes],
                    }
                )
                continue
            results.append(run_workload(name, kind, cfg, dtype_opt, device, args))

    md = render(results, args)
    paths = common.write_results("step", device, env, {"results": results}, md, args.out_dir)
    print("\n" + md, flush=True)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
