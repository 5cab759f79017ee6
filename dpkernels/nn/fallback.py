"""The fallback: per-example gradients of a module's own small parameters by torch.func.

For a module with trainable parameters θ of its own and no registered DP layer (a ViT's
``cls_token`` and position embeddings, a layer-scale vector, a learned bias outside any
layer), example i's gradient is the vector-Jacobian product of the module's function f at
example i's input with example i's output gradient:

    g_i = (∂f(θ; x_i)/∂θ)ᵀ G_i            computed as vmap over i of vjp(θ ↦ f(θ; x_i))(G_i)

which is G_i itself for an added (1, T, d) parameter, G_i's slice at a concatenated token, and
Σ_t x_it ⊙ G_it for an elementwise scale: whatever the function is. The (B, *θ.shape) gradients
then go through the fused clip-sum-noise like a norm layer's (``DenseGradients``).

How: the private forward runs f with θ detached behind an identity (``_Sink``) that receives θ's
batch gradient instead of θ, and marks f's outputs with an identity (``_Capture``) that receives
their gradient G. When G arrives in backward, f is run again on each example alone (kept as a
batch of one, so the module sees the shapes it expects; DP layers inside run as their plain
torch layers and record nothing) and differentiated with respect to θ. When θ's batch
gradient arrives, it must equal Σ_i g_i: a module that draws random numbers (dropout in
training), or mixes examples, fails that check and the backward raises, naming the module.

Who runs on it: ``make_private`` puts every unregistered module whose own trainable parameters
number at most ``FALLBACK_MAX_PARAMETERS`` on it, and says so (a ``DPFallbackWarning``, and
``DPOptimizer.fallback_modules``); ``make_private(..., fallback=False)`` refuses them instead.
BatchNorm, which mixes the examples of a batch, is never put on it. The guard (``engine/guard.py``)
checks the module's batch inputs like any DP layer's, and its probe checks its rows follow the
examples. Integrations use ``fallback_call`` directly on the smallest method that uses the
parameters (timm's ``VisionTransformer._pos_embed``), so that f is not the whole model.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .module import DenseGradients, become

# The most elements a module's own trainable parameters may have to run on the fallback: its
# per-example gradients (B × that, float32) are kept until the step.
FALLBACK_MAX_PARAMETERS = 2**20


class DPFallbackWarning(UserWarning):
    """make_private put modules on the torch.func fallback (exact, slower than a fused DP layer)."""


@contextlib.contextmanager
def _swapped_parameters(module: nn.Module, tensors: Dict[str, torch.Tensor]) -> Iterator[None]:
    """``module``'s own parameters replaced by ``tensors`` (by name) for the duration."""
    saved = {name: module._parameters[name] for name in tensors}
    try:
        for name, t in tensors.items():
            module._parameters[name] = t
        yield
    finally:
        for name, p in saved.items():
            module._parameters[name] = p


class _Sink(torch.autograd.Function):
    """θ → a tensor equal to θ whose gradient is handed to ``call.batch_gradient`` instead of θ."""

    @staticmethod
    def forward(ctx: Any, param: torch.Tensor, call: "_FallbackCall", name: str) -> torch.Tensor:
        ctx.call, ctx.name = call, name
        return param.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        ctx.call.batch_gradient(ctx.name, grad)
        return None, None, None


class _Capture(torch.autograd.Function):
    """f's output tensors, unchanged; their gradients G go to ``call.per_example`` on the way back."""

    @staticmethod
    def forward(ctx: Any, call: "_FallbackCall", *outputs: torch.Tensor):
        ctx.call = call
        return tuple(o.view_as(o) for o in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor):
        ctx.call.per_example(grads)
        return (None, *grads)


class _FallbackCall:
    """One private call of f = fn(module, *args, **kwargs): what backward needs to finish it."""

    def __init__(
        self,
        module: "FallbackPath",
        fn: Callable,
        args: tuple,
        kwargs: dict,
        batch_dims: Dict[int, int],
        names: List[str],
    ) -> None:
        self.module, self.fn, self.args, self.kwargs = module, fn, args, kwargs
        self.batch_dims = batch_dims  # id(leaf) -> batch dim, for the inputs split into examples
        self.names = names
        self.out_dims: List[int] = []
        self.grads: Optional[Dict[str, torch.Tensor]] = None
        self.pending = set(names)

    def per_example(self, cotangents: Sequence[torch.Tensor]) -> None:
        module = self.module
        guard = module._dp_collector.guard
        if guard.mode == "probe":  # the guard's gradient-flow check: nothing to compute or record
            return
        B = guard.batch_size
        params = {n: getattr(module, n).detach() for n in self.names}
        flat, spec = pytree.tree_flatten((self.args, self.kwargs))
        mapped = [i for i, leaf in enumerate(flat) if isinstance(leaf, torch.Tensor) and id(leaf) in self.batch_dims]
        ex_inputs = [flat[i].unflatten(self.batch_dims[id(flat[i])], (B, 1)) for i in mapped]
        in_dims = [self.batch_dims[id(flat[i])] for i in mapped]
        cots = [c.unflatten(d, (B, 1)) if c is not None else None for c, d in zip(cotangents, self.out_dims)]
        keep = [k for k, c in enumerate(cots) if c is not None]

        def one_example(theta: Dict[str, torch.Tensor], inputs: List[torch.Tensor], cot: List[torch.Tensor]):
            leaves = list(flat)
            for i, t in zip(mapped, inputs):
                leaves[i] = t
            args, kwargs = pytree.tree_unflatten(leaves, spec)

            def f(th: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
                with _swapped_parameters(module, th):
                    out = tensor_outputs(self.fn(module, *args, **kwargs))
                return tuple(out[k] for k in keep)

            _, vjp = torch.func.vjp(f, theta)
            return vjp(tuple(cot))[0]

        mode, guard.mode = guard.mode, "plain"  # DP layers inside f: their plain torch layers, no records
        try:
            with torch.enable_grad():
                grads = torch.func.vmap(
                    one_example, in_dims=(None, in_dims, [self.out_dims[k] for k in keep]), randomness="different"
                )(params, ex_inputs, [cots[k] for k in keep])
        finally:
            guard.mode = mode
        self.grads = {n: g.float() for n, g in grads.items()}
        module._dp_collector.for_module(module).record(self.grads, *self.grads.values())

    def batch_gradient(self, name: str, grad: torch.Tensor) -> None:
        """θ's batch gradient from the original graph: it must be Σ_i g_i (see the module docstring)."""
        if self.module._dp_collector.guard.mode == "probe":
            return
        if self.grads is None:
            raise RuntimeError(
                f"fallback module '{self.module._dp_name()}': parameter '{name}' received a gradient that does not "
                "pass through the module's outputs; its per-example gradient is unknown, refusing"
            )
        total = self.grads[name].sum(dim=0)
        err = float((total - grad.float()).norm())
        scale = float(grad.float().norm()) + float(self.grads[name].norm()) * 1e-3 + 1e-30
        tol = 1e-3 if grad.dtype in (torch.float32, torch.float64) else 5e-2
        if err > tol * scale:
            raise RuntimeError(
                f"fallback module '{self.module._dp_name()}' ({type(self.module).__name__}): the per-example "
                f"gradients of '{name}', recomputed example by example, do not add up to its batch gradient "
                f"(relative difference {err / scale:.2g}). The module draws random numbers in training (dropout?) "
                "or mixes the examples of a batch, so its per-example gradients cannot be recomputed; put it in "
                "eval mode, move the randomness out of it, register a DP layer for it, or freeze its parameters"
            )


def _library_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward of the module's own class, the one FallbackPath was put in front of."""
    return super(FallbackPath, module).forward(*args, **kwargs)


def tensor_outputs(output: Any) -> List[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


class FallbackPath(DenseGradients):
    """Mixin putting a module's own small parameters on the fallback (see the module docstring)."""

    def _dp_name(self) -> str:
        return self._dp_collector.for_module(self).name if self._dp_collector is not None else type(self).__name__

    def _dp_own(self) -> List[str]:
        return [n for n, p in self.named_parameters(recurse=False) if p.requires_grad]

    def _dp_fallback_private(self) -> bool:
        return self.dp_private_forward() and bool(self._dp_own())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._dp_fallback_private():
            return super().forward(*args, **kwargs)
        return self.fallback_call(_library_forward, *args, **kwargs)

    def fallback_call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """fn(self, *args, **kwargs) with per-example gradients of this module's own trainable parameters."""
        names = self._dp_own()
        guard = self._dp_collector.guard
        B = guard.batch_size
        flat, spec = pytree.tree_flatten((args, kwargs))
        batch_dims: Dict[int, int] = {}
        batched = []
        from ..engine.guard import batch_dim_of_input

        for leaf in flat:
            if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
                bd = batch_dim_of_input(leaf, guard.batch_first)
                if B is not None and leaf.shape[bd] == B:
                    batch_dims[id(leaf)] = bd
                    batched.append((leaf, bd))
        if not batched:
            raise ValueError(
                f"fallback module '{self._dp_name()}' ({type(self).__name__}) got no input with the batch's {B} "
                "examples on its batch dimension, so its parameters' per-example gradients cannot be computed; "
                "freeze them, or register a DP layer for this module"
            )
        for leaf, bd in batched:  # the guard checks them as any DP layer's rows
            self.dp_examples(leaf, batch_dim=bd)
        call = _FallbackCall(self, fn, args, kwargs, batch_dims, names)
        sunk = {n: _Sink.apply(getattr(self, n), call, n) for n in names}
        with _swapped_parameters(self, sunk):
            output = fn(self, *args, **kwargs)
        out_flat, out_spec = pytree.tree_flatten(output)
        idx = [i for i, t in enumerate(out_flat) if isinstance(t, torch.Tensor) and t.requires_grad]
        for i in idx:
            t = out_flat[i]
            bd = batch_dim_of_input(t, guard.batch_first)
            if t.dim() == 0 or t.shape[bd] != B:
                raise ValueError(
                    f"fallback module '{self._dp_name()}' ({type(self).__name__}) returned a tensor of shape "
                    f"{tuple(t.shape)} without the batch's {B} examples on its batch dimension; its parameters' "
                    "per-example gradients need per-example outputs. Freeze them or register a DP layer"
                )
            call.out_dims.append(bd)
        if not idx:
            return output
        captured = _Capture.apply(call, *[out_flat[i] for i in idx])
        for i, t in zip(idx, captured):
            out_flat[i] = t
        return pytree.tree_unflatten(out_flat, out_spec)


def fallback_candidates(model: nn.Module, limit: Optional[int] = None) -> List[Tuple[str, nn.Module, str]]:
    """(name, module, why) of the modules ``make_private`` would put on the fallback: own trainable
    parameters, no DP layer, no BatchNorm, at most ``limit`` (FALLBACK_MAX_PARAMETERS) elements."""
    from .module import DPModule
    from .registry import explain, qualified_name

    limit = FALLBACK_MAX_PARAMETERS if limit is None else limit
    out = []
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own or isinstance(module, (DPModule, nn.modules.batchnorm._BatchNorm)):
            continue
        size = sum(p.numel() for _, p in own)
        if size > limit:
            continue
        reason = explain(module) or f"no DP layer is registered for {qualified_name(type(module))}"
        out.append(
            (
                name,
                module,
                f"{reason}; its {size} own parameter elements "
                f"({', '.join(n for n, _ in own)}) get per-example gradients by torch.func",
            )
        )
    return out


def put_on_fallback(model: nn.Module, enabled: bool) -> List[Tuple[str, str]]:
    """Turn the fallback candidates of ``model`` into FallbackPath modules in place (when ``enabled``);
    (name, why) of each, reported by a DPFallbackWarning."""
    if not enabled:
        return []
    chosen = fallback_candidates(model)
    for _, module, _ in chosen:
        become(module, FallbackPath, type(module))
    report = [(name or "<root>", why) for name, _, why in chosen]
    if report:
        warnings.warn(
            "make_private runs these modules on the torch.func fallback (exact per-example gradients, slower than "
            "a fused DP layer; make_private(..., fallback=False) refuses them instead):\n  - "
            + "\n  - ".join(f"{name}: {why}" for name, why in report),
            DPFallbackWarning,
            stacklevel=3,
        )
    return report
