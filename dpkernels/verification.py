"""verify: check a model's private gradient against a float64 per-example loop.

    report = dpkernels.verify(model, loss_fn, batch)     # loss_fn(model, batch) -> scalar loss
    print(report)                                        # per parameter: relative error, verdict
    assert report.ok

It makes two copies of ``model`` (the model itself is not touched), both in eval mode so that
dropout draws nothing:

- the private one goes through ``make_private`` with no noise; one backward of
  ``loss_fn(model, batch)`` and the engine writes every trainable parameter's
  (Σ_i c_i g_i) / B̄;
- the reference one is cast to float64 and run once per example, ``loss_fn(ref, batch_i)``
  on the one-example batch batch_i, giving g_i = ∇θ ℓ_i the slow, obvious way; the clip
  factors c_i of the chosen clipping style and Σ_i c_i g_i / B̄ follow in float64.

Every tensor of ``batch`` (any nesting of tuples, lists and dicts) with B rows on its batch
dimension is split into examples (dimension 0, or 1 for ``batch_first=False`` tensors with
two or more dimensions, B taken from the first tensor); other values are passed as they are.
The per-example loss is then the loss of a batch of one, so with ``loss_reduction="mean"``
the check also tells whether the batch loss is the mean of per-example losses (a token mean
over examples of different lengths is not, and shows up as a mismatch).

``max_grad_norm`` defaults to the median of the per-example gradient norms, so that about half
the examples are clipped and the check covers both sides of the clip.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .engine.clipping import CLIP_EPS
from .engine.guard import batch_dim_of_input, tensor_leaves


@dataclass
class ParameterCheck:
    name: str
    shape: tuple
    rel_err: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tolerance


@dataclass
class VerifyReport:
    """What ``verify`` found: one ``ParameterCheck`` per trainable parameter, and the clipping it used."""

    parameters: List[ParameterCheck]
    batch_size: int
    max_grad_norm: float
    clipping: str
    clipped_fraction: float
    per_example_norms: List[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.parameters) and all(p.ok for p in self.parameters)

    @property
    def max_rel_err(self) -> float:
        return max((p.rel_err for p in self.parameters), default=float("nan"))

    def failures(self) -> List[ParameterCheck]:
        return [p for p in self.parameters if not p.ok]

    def __str__(self) -> str:
        verdict = (
            "OK: the private gradient equals the per-example float64 reference"
            if self.ok
            else (f"MISMATCH in {len(self.failures())} of {len(self.parameters)} parameters")
        )
        lines = [
            f"dpkernels.verify: {verdict}",
            f"  B = {self.batch_size}, clipping = {self.clipping}, C = {self.max_grad_norm:.4g}, "
            f"{self.clipped_fraction:.0%} of the examples clipped, worst relative error {self.max_rel_err:.2e}",
        ]
        width = max((len(p.name) for p in self.parameters), default=9)
        lines.append(f"  {'parameter':<{width}}  {'shape':<18} {'rel. err':>9}  verdict")
        for p in self.parameters:
            lines.append(f"  {p.name:<{width}}  {str(p.shape):<18} {p.rel_err:9.2e}  {'ok' if p.ok else 'MISMATCH'}")
        return "\n".join(lines)


def _split_examples(batch: Any, batch_first: bool) -> List[Any]:
    leaves = [t for t in tensor_leaves(batch) if t.dim() >= 1]
    if not leaves:
        raise ValueError("verify: batch holds no tensor with a batch dimension")
    B = leaves[0].shape[batch_dim_of_input(leaves[0], batch_first)]

    def one(i: int) -> Any:
        def pick(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                bd = batch_dim_of_input(t, batch_first)
                if t.shape[bd] == B:
                    return t.narrow(bd, i, 1)
            return t

        return pytree.tree_map(pick, batch)

    return [one(i) for i in range(B)]


def _to_float64(batch: Any) -> Any:
    return pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, batch)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2


def verify(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    *,
    max_grad_norm: Optional[float] = None,
    clipping: str = "flat",
    groups: Optional[Sequence[Sequence[str]]] = None,
    auto_clip_gamma: float = 0.01,
    loss_reduction: str = "mean",
    batch_first: bool = True,
    expected_batch_size: Optional[int] = None,
    norm_method: str = "auto",
    backend: Optional[str] = None,
    rtol: Optional[float] = None,
) -> VerifyReport:
    """Compare ``model``'s noise-free private gradient on ``batch`` with a float64 per-example loop.

    ``loss_fn(model, batch)`` returns the batch's scalar loss (a mean over examples for
    ``loss_reduction="mean"``, a sum for "sum"). The other arguments are ``make_private``'s.
    ``rtol``: the relative error accepted per parameter, ‖private − reference‖ / max(‖reference‖,
    10⁻⁴ ‖whole reference gradient‖) (the floor for parameters whose true gradient is zero, such
    as attention's key bias), by default 1e-5 for float32 parameters and 2e-2 for 16-bit ones.
    Raises what ``make_private`` or the private step raises when they refuse the model (that is a
    verdict too).
    """
    from .engine.make_private import make_private

    examples = _split_examples(batch, batch_first)
    B = len(examples)
    Bbar = expected_batch_size or B

    reference = copy.deepcopy(model).double().eval()
    ref_params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    if not ref_params:
        raise ValueError("verify: the model has no trainable parameter")
    per_example: Dict[str, List[torch.Tensor]] = {n: [] for n in ref_params}
    for ex in examples:
        reference.zero_grad(set_to_none=True)
        loss = loss_fn(reference, _to_float64(ex))
        loss.backward()
        for n, p in ref_params.items():
            per_example[n].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    g = {n: torch.stack(v) for n, v in per_example.items()}  # (B, *shape) float64
    total_sq = sum(t.flatten(1).square().sum(1) for t in g.values())
    norms = total_sq.sqrt()
    if max_grad_norm is None:
        max_grad_norm = float(norms.median())
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"verify: the per-example gradient norms are degenerate (median {max_grad_norm})")

    private = copy.deepcopy(model).eval()
    sgd = torch.optim.SGD([p for p in private.parameters() if p.requires_grad], lr=0.0)
    private, optimizer = make_private(
        private,
        sgd,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=Bbar,
        loss_reduction=loss_reduction,
        batch_first=batch_first,
        clipping=clipping,
        groups=groups,
        auto_clip_gamma=auto_clip_gamma,
        norm_method=norm_method,
        backend=backend,
        seed=0,
    )
    loss_fn(private, batch).backward()
    optimizer.write_private_grads()

    # the reference clip factors, group by group, as the plan the engine used defines them
    plan = optimizer.clipping
    layer_of = {}
    for layer_name, module in optimizer.dp_modules:
        for n, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                layer_of[f"{layer_name}.{n}" if layer_name else n] = layer_name
    group_sq: Dict[int, torch.Tensor] = {}
    for n, t in g.items():
        k = plan.group_of[layer_of[n]]
        group_sq[k] = group_sq.get(k, 0) + t.flatten(1).square().sum(1)
    factors = {}
    clipped = torch.zeros(B, dtype=torch.bool, device=norms.device)
    for k, sq in group_sq.items():
        nk = sq.sqrt()
        C_k = plan.group_norms[k]
        if plan.style == "automatic":
            factors[k] = C_k / (nk + plan.gamma)
        else:
            factors[k] = (C_k / (nk + CLIP_EPS)).clamp(max=1.0)
        clipped |= factors[k] < 1.0
    checks = []
    private_params = dict(private.named_parameters())
    expected = {}
    for n, t in g.items():
        c = factors[plan.group_of[layer_of[n]]]
        expected[n] = torch.einsum("i,i...->...", c, t) / Bbar
    # a parameter whose true gradient is (nearly) zero, such as attention's key bias under softmax, is
    # judged against the scale of the whole gradient instead of its own norm
    floor = 1e-4 * float(torch.sqrt(sum(e.square().sum() for e in expected.values())))
    for n, t in g.items():
        got = private_params[n].grad
        if got is None:
            rel = float("inf")
        else:
            rel = float((got.detach().double() - expected[n]).norm()) / max(float(expected[n].norm()), floor, 1e-300)
        tol = rtol if rtol is not None else _tolerance(private_params[n].dtype)
        checks.append(ParameterCheck(n, tuple(t.shape[1:]), rel, tol))
    return VerifyReport(
        checks, B, float(max_grad_norm), clipping, float(clipped.double().mean()), [float(v) for v in norms]
    )
