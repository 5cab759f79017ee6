"""make_private: turn (model, optimizer) into a DP-SGD pair with flat clipping, one backward."""

from __future__ import annotations

import math
import secrets
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..nn import fallback as _fallback
from ..nn import registry
from ..nn.convert import convert
from ..nn.module import DPModule
from ..ops.linear_sq_norms import METHODS
from . import fsdp as _fsdp
from .clipping import make_plan
from .collector import StepCollector
from .distributed import RankGroup
from .fsdp_probe import ProbeBracket
from .guard import ExampleGuard
from .optimizer import LOSS_REDUCTIONS, DPOptimizer
from .ties import TieSet

_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


def _unsupported_message(name: str, module: nn.Module, params: List[str]) -> str:
    label = f"{type(module).__name__} '{name or '<root>'}' ({', '.join(params)})"
    if isinstance(module, _BATCHNORM):
        return (
            f"{label}: BatchNorm mixes the examples of a batch, so per-example gradients do not exist; "
            "replace it with GroupNorm/LayerNorm or freeze it (requires_grad_(False), eval())"
        )
    size = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
    limit = _fallback.FALLBACK_MAX_PARAMETERS
    if size > limit:
        fallback = f"; its {size} own parameter elements are too many for the torch.func fallback ({limit})"
    else:
        fallback = "; make_private(..., fallback=True) would run it on the torch.func fallback"
    reason = registry.explain(module)
    if reason is not None:
        return f"{label}: {reason}{fallback}; or freeze these parameters"
    return (
        f"{label}: no per-example clipping path (no DP layer is registered for "
        f"{registry.qualified_name(type(module))}){fallback}; freeze these parameters, "
        "use a supported layer, or register a DP layer for it (dpkernels.nn.register_dp_layer, see the README)"
    )


def _check_model(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The DP modules of ``model``; refuses any trainable parameter without a clipping path."""
    problems: List[str] = []
    dp_modules: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if isinstance(module, DPModule):
            if module._dp_collector is not None:
                raise RuntimeError(f"module '{name}' is already attached to a private optimizer")
            reason = module.dp_unsupported_reason() if own else None
            if reason is not None:
                problems.append(
                    f"{type(module).__name__} '{name or '<root>'}' ({', '.join(n for n, _ in own)}): {reason}"
                )
            dp_modules.append((name, module))
        elif own:
            problems.append(_unsupported_message(name, module, [n for n, _ in own]))
        elif isinstance(module, _BATCHNORM) and module.training and module.track_running_stats:
            problems.append(
                f"{type(module).__name__} '{name}': in training mode BatchNorm mixes the examples of a batch "
                "through its batch statistics, even frozen; put it in eval() mode or replace it"
            )
    if problems:
        raise ValueError(
            "make_private cannot clip every trainable parameter of this model:\n  - " + "\n  - ".join(problems)
        )
    if not any(p.requires_grad for _, m in dp_modules for p in m.parameters(recurse=False)):
        raise ValueError("make_private: the model has no trainable parameter")
    return dp_modules


def _check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, dp_params: Dict[int, str]) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, DPOptimizer):
        raise RuntimeError("the optimizer is already a DPOptimizer")
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in dp_params:
                where = f"model parameter '{names[id(p)]}'" if id(p) in names else "a tensor that is not in the model"
                raise ValueError(
                    f"the optimizer updates {where}, which has no per-example clipping path "
                    "(frozen, or not part of a DP layer): it would be trained without privacy"
                )


def _check_ties(ties: TieSet, modules: Dict[str, nn.Module]) -> None:
    """Refuse a parameter shared by layers that cannot describe their use of it (``DPModule.dp_use``)."""
    for layer_uses in ties.uses.values():
        unable = [layer for layer, _ in layer_uses if type(modules[layer]).dp_use is DPModule.dp_use]
        if unable:
            names = ", ".join(f"'{layer}.{n}'" if layer else n for layer, n in layer_uses)
            raise ValueError(
                f"parameter {names} is shared by several DP layers, and {', '.join(unable)} "
                f"({', '.join(type(modules[u]).__name__ for u in unable)}) cannot take part in a tie yet; untie the "
                "parameter or freeze it (requires_grad_(False))"
            )


def _guard_param(name: str) -> Any:
    def hook(grad: Optional[torch.Tensor]) -> None:
        if grad is None:  # the DP layer's own backward returns no gradient for its parameters
            return
        raise RuntimeError(
            f"parameter '{name}' received a gradient outside its DP layer (used by another op: weight tying, "
            "a functional call, a custom layer). That gradient would not be clipped; refusing it"
        )

    return hook


def _validate_numbers(
    noise_multiplier: float, max_grad_norm: Any, expected_batch_size: int, loss_reduction: str
) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    thresholds = list(max_grad_norm) if isinstance(max_grad_norm, (list, tuple)) else [max_grad_norm]
    if not thresholds or not all(isinstance(c, (int, float)) and math.isfinite(c) and c > 0 for c in thresholds):
        raise ValueError(f"max_grad_norm must be a finite number > 0 (or a list of them), got {max_grad_norm!r}")
    if not (isinstance(expected_batch_size, int) and expected_batch_size > 0):
        raise ValueError(f"expected_batch_size must be a positive int, got {expected_batch_size!r}")
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: Union[float, Sequence[float]],
    expected_batch_size: int,
    loss_reduction: str = "mean",
    seed: Optional[int] = None,
    norm_method: str = "auto",
    backend: Optional[str] = None,
    accountant: Any = None,
    sample_rate: Optional[float] = None,
    check_finite: bool = True,
    batch_first: bool = True,
    clipping: str = "flat",
    groups: Optional[Sequence[Sequence[str]]] = None,
    auto_clip_gamma: float = 0.01,
    distributed: bool = False,
    fallback: bool = True,
) -> Tuple[nn.Module, DPOptimizer]:
    """Make ``loss.backward(); optimizer.step()`` one DP-SGD step with per-example clipping.

    The model's layers with a per-example clipping path become their DP versions in place,
    sharing their parameters (``dpkernels.nn.convert`` and its registry: nn.Linear → DPLinear,
    nn.Conv1d/2d → DPConv1d/2d, nn.Embedding → DPEmbedding, nn.LayerNorm / nn.RMSNorm /
    nn.GroupNorm → DPLayerNorm / DPRMSNorm / DPGroupNorm, nn.MultiheadAttention →
    DPMultiheadAttention, and the transformers / timm classes of ``dpkernels.integrations``);
    any other trainable parameter (BatchNorm's, an unregistered layer's) is refused with an
    error naming its module, as is an optimizer that updates a parameter without a clipping
    path. After it, one backward pass records per-example
    norms, and ``optimizer.step()`` writes (Σ_i clip_C(g_i) + σ·C·z) / B̄ into every parameter's
    .grad (B̄ = ``expected_batch_size``) before the wrapped optimizer's own step.

    ``loss_reduction``: "mean" if the loss averages over the batch (per-example gradients are
    then the batch size times what backward sees), "sum" if it sums. ``seed``: the 64-bit noise
    seed (default: fresh from the OS CSPRNG; pass one to reproduce a run). ``norm_method``:
    "auto", "ghost" or "direct" (see ``functional.linear_sq_norms``). ``backend``: see
    ``dpkernels.functional``. ``accountant`` (with ``sample_rate``): anything with
    ``step(noise_multiplier=, sample_rate=, steps=)``, e.g. ``dpkernels.accounting.PLDAccountant``,
    fed once per step. Batches must be non-empty; for an empty Poisson batch call
    ``optimizer.noise_only_step()``.

    ``batch_first``: where the examples are. True (default): dimension 0 of the model's input
    and of every layer input, (B, d) or (B, *, d). False: sequence-first input, (T, B, *) or
    (T, B), and dimension 1 of layer inputs with 3 or more dimensions, (T, B, *, d) (dimension 0
    of (B, d) ones). The guard (``dpkernels.engine.guard``) reads B from the model's input at
    every call, refuses any DP layer whose rows it cannot show to be examples of that batch
    (at the first step, a probe re-indexes the examples and checks that every layer's rows
    follow), and, as a second line, a step reporting more examples than ``expected_batch_size``
    can plausibly produce (more than B̄ + 8√B̄ + 8). Call the model itself, not its submodules.

    ``clipping`` (see ``dpkernels.engine.clipping``): "flat" (default: one norm over every
    layer), "automatic" (flat, c_i = C / (‖g_i‖ + ``auto_clip_gamma``)), "per_layer" (each DP
    layer clipped by its own norm, inside backward: no (x, G) is kept until the step) or
    "group" (``groups``: lists of DP layer names, every layer in exactly one). A single
    ``max_grad_norm`` C is split evenly over the K groups (C_k = C/√K); a list gives each C_k.
    Either way every example's clipped gradient has norm at most sqrt(Σ C_k²), and the noise
    is σ times that.

    ``fallback``: a module with trainable parameters of its own, no registered DP layer and at most
    ``dpkernels.nn.fallback.FALLBACK_MAX_PARAMETERS`` of them (bare parameters such as a ViT's
    class token, a layer-scale vector) gets exact per-example gradients by torch.func
    (``dpkernels.nn.fallback``); make_private names such modules in a ``DPFallbackWarning`` and in
    ``optimizer.fallback_modules``. ``fallback=False`` refuses them instead. BatchNorm is refused
    either way.

    Several processes (``dpkernels.engine.distributed``; torch.distributed initialised first, one
    process per rank): ``distributed=True`` with the plain model, or the model wrapped in
    ``DistributedDataParallel``, or sharded with FSDP2's ``fully_shard`` (after
    ``dpkernels.nn.convert(model)``, and with the optimizer built on the sharded parameters:
    ``dpkernels.engine.fsdp``). Every rank passes the same model, the global
    ``expected_batch_size`` B̄ = q·N, and Poisson-samples its own disjoint shard of the data with
    rate q. Replicated parameters start from rank 0's (broadcast now). At each step each rank clips
    its own examples, the ranks' clipped sums are added (all-reduce; reduce-scatter for FSDP2's
    shards) and every element's noise is drawn once, by the rank that owns it, so every rank applies
    exactly the update of one process on the union batch, noise included. DDP's own gradient
    all-reduce is switched off (``require_backward_grad_sync = False``): it would reduce gradients
    before clipping. The DDP wrapper is returned and is what the training loop calls.
    ``noise_only_step()`` is for a rank whose own batch is empty (under FSDP2 with a ``closure``
    running the model on public padding rows, whose clip factors are 0: its forward and backward
    are collectives); every rank must call step() or noise_only_step() each step.
    """
    _validate_numbers(noise_multiplier, max_grad_norm, expected_batch_size, loss_reduction)
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first must be True or False, got {batch_first!r}")
    if norm_method not in METHODS:
        raise ValueError(f"norm_method must be one of {METHODS}, got {norm_method!r}")
    if accountant is not None and not (sample_rate is not None and 0 < sample_rate <= 1):
        raise ValueError("an accountant needs sample_rate in (0, 1] (the Poisson sampling probability)")
    if accountant is not None and noise_multiplier == 0:
        raise ValueError("noise_multiplier = 0 gives no privacy: there is nothing for an accountant to account")
    if seed is None:
        seed = secrets.randbits(64)
    elif not (isinstance(seed, int) and 0 <= seed < 2**64):
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")

    if isinstance(model, nn.DataParallel):
        raise ValueError(
            "make_private does not support nn.DataParallel: its replicas bypass the per-example clipping path; "
            "use DistributedDataParallel (one process per GPU) or make_private(..., distributed=True)"
        )
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    if not isinstance(fallback, bool):
        raise TypeError(f"fallback must be True or False, got {fallback!r}")
    ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
    wrapper, model = model, (ddp.module if ddp is not None else model)
    _fsdp.refuse_fsdp1(model)
    units = _fsdp.fsdp_modules(model)
    if ddp is not None and units:
        raise ValueError("a DistributedDataParallel model with FSDP2 units inside is not supported: use one of them")
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules()):
        raise ValueError("DistributedDataParallel inside the model is not supported: wrap the whole model, once")
    ranks = RankGroup(True, ddp.process_group, ddp=ddp) if ddp is not None else RankGroup(distributed or bool(units))
    inside_units = _fsdp.modules_inside(units)
    converted = convert(model)
    if ddp is not None and converted is not model:
        ddp.module = converted
    model = converted
    _fsdp.check_not_replaced(model, units, inside_units)
    fallbacks = _fallback.put_on_fallback(model, fallback)
    dp_modules = _check_model(model)

    # one noise stream per parameter, however many layers use it (a tied parameter gets its noise once)
    streams: Dict[int, int] = {}
    param_names: Dict[int, str] = {}
    uses: Dict[int, List[Tuple[str, str]]] = {}
    params: Dict[int, nn.Parameter] = {}
    for mod_name, module in dp_modules:
        for n, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                uses.setdefault(id(p), []).append((mod_name, n))
                params[id(p)] = p
                if id(p) not in streams:
                    streams[id(p)] = len(streams)
                    param_names[id(p)] = f"{mod_name}.{n}" if mod_name else n
    ties = TieSet(uses, params)
    _check_ties(ties, dict((n, m) for n, m in dp_modules))
    _check_optimizer(optimizer, model, param_names)
    trainable_layers = [n for n, m in dp_modules if any(p.requires_grad for p in m.parameters(recurse=False))]
    plan = make_plan(clipping, trainable_layers, max_grad_norm, groups, auto_clip_gamma, ties=ties.layer_groups())

    if units:
        ranks.shard_with(_fsdp.FSDPSharding(model, units, param_names, plan.clips_in_backward))
    ranks.broadcast_module(model)  # every rank starts from rank 0's replicated weights
    guard = ExampleGuard(batch_first)
    bracket = ProbeBracket(model, guard, ranks, units) if units else None
    if bracket is not None:  # its hooks around the guard's: before them, and after
        bracket.attach_before_guard()
    guard.attach(model, {m: n for n, m in dp_modules if any(p.requires_grad for p in m.parameters(recurse=False))})
    if bracket is not None:
        bracket.attach_after_guard()
    collector = StepCollector({m: n for n, m in dp_modules}, norm_method, backend, batch_first=batch_first, guard=guard)
    if ranks.distributed:  # a compiled backward refuses to record (autograd/_record.py)
        collector.compile_refusal = (
            "torch.compile of a model made private across processes (distributed=True, DDP or FSDP2) is not "
            "supported: the hand-over of each layer's clipped sum to the ranks' reductions and FSDP2's hooks run "
            "inside backward and are not shown to survive a compiled backward. Run this model uncompiled"
        )
    for _, module in dp_modules:
        module.dp_attach(collector)
    for pid, p in params.items():
        p.register_hook(_guard_param(param_names[pid]))
    if ranks.sharding is not None:  # FSDP2's unsharded parameters are what autograd sees
        ranks.sharding.guard_unsharded(dp_modules, _guard_param)
        ranks.sharding.attach(model)
    if ddp is not None:  # DDP's reducer would all-reduce gradients before clipping: it never runs
        ddp.require_backward_grad_sync = False
        ddp.require_forward_param_sync = False

    dp_optimizer = DPOptimizer(
        optimizer,
        modules=dp_modules,
        streams=streams,
        param_names=param_names,
        collector=collector,
        noise_multiplier=noise_multiplier,
        max_grad_norm=plan.total_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction=loss_reduction,
        seed=seed,
        backend=backend,
        accountant=accountant,
        sample_rate=sample_rate,
        check_finite=check_finite,
        clipping=plan,
        ranks=ranks,
        ties=ties,
    )
    dp_optimizer.fallback_modules = fallbacks
    return (wrapper if ddp is not None else model), dp_optimizer
