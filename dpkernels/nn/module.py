"""The contract between a DP layer and the engine.

A DP module owns some trainable parameters and, when attached to an engine's collector,
reports per-example squared norms during backward and writes its parameters' clipped,
noised gradients at step time. Outside an engine it behaves exactly like its torch parent.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..ops.philox import PhiloxKey


class DPModule:
    """Mixin for layers with a per-example clipping path (see DPLinear).

    In a private forward a DP layer hands its input to ``dp_examples``, which the engine's guard
    (``dpkernels.engine.guard``) answers with the layout of the examples (and a broadcast input
    expanded to the batch), or refuses. ``_dp_layout`` is the declared layout: "batch", or
    "flattened" (``dpkernels.nn.declare_flattened``).
    """

    _dp_collector: Optional[Any] = None
    _dp_layout: str = "batch"

    @classmethod
    def adopt(cls, source: nn.Module, attributes: Sequence[str], parameters: Sequence[str]) -> Any:
        """An instance of this DP class built from the torch layer ``source`` without running its
        constructor: the listed plain ``attributes`` copied, the listed ``parameters`` the very same
        Parameter objects (or registered as None where ``source`` has None), the training mode kept.
        Optimizers built before the conversion keep pointing at the right tensors."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in attributes:
            value = getattr(source, name)
            setattr(new, name, list(value) if isinstance(value, list) else value)
        for name in parameters:
            param = getattr(source, name, None)
            if param is None:
                new.register_parameter(name, None)
            else:
                setattr(new, name, param)
        if "_dp_layout" in source.__dict__:
            new._dp_layout = source._dp_layout
        new.train(source.training)
        return new

    def dp_attach(self, collector: Any) -> None:
        self._dp_collector = collector

    def dp_detach(self) -> None:
        self._dp_collector = None

    def dp_unsupported_reason(self) -> Optional[str]:
        """Why this layer, as configured, cannot be trained with per-example clipping; None if it can.
        ``make_private`` refuses the model with this reason, naming the layer."""
        return None

    def dp_private_forward(self) -> bool:
        """Whether this forward call must go through the per-example path (attached to an engine, with
        gradient tracking on, and not in the guard's probe of the original model)."""
        collector = self._dp_collector
        return collector is not None and torch.is_grad_enabled() and collector.guard.mode != "plain"

    def dp_examples(self, *inputs: torch.Tensor, batch_dim: int) -> Tuple[List[torch.Tensor], List[Any]]:
        """The guard's answer for this layer's ``inputs`` with examples on ``batch_dim``: the inputs (one
        with a single row on ``batch_dim`` expanded to the batch) and their ``ExampleLayout``s. Raises,
        naming the layer, when the rows cannot be shown to be examples."""
        return self._dp_collector.guard.admit(self, inputs, batch_dim, self._dp_layout)

    def dp_sq_norms(self, *norm_inputs: torch.Tensor, method: str, backend: Optional[str]) -> torch.Tensor:
        """float32 (B,): Σ over this module's trainable parameters of ‖per-example gradient‖²,
        from the tensors its autograd function hands to ``ModuleCollector.record``."""
        raise NotImplementedError

    def dp_use(self, payload: Any, name: str) -> Any:
        """This layer's use of its parameter ``name``, from its recorded ``payload``, as one of the forms
        of ``dpkernels.engine.ties`` (for the cross terms of a parameter tied across layers). A layer
        that does not implement it cannot share a parameter; ``make_private`` refuses such a tie."""
        raise NotImplementedError(f"{type(self).__name__} cannot share a parameter with another layer")

    def dp_clipped_grads(
        self,
        payload: Any,
        clip_factors: torch.Tensor,
        noise_std: float,
        keys: Dict[str, PhiloxKey],
        backend: Optional[str],
        out_dtype: Optional[torch.dtype] = None,
    ) -> Dict[str, torch.Tensor]:
        """Gradients (by parameter name) = Σ_i clip_factors_i g_i + noise_std·z, from ``payload``,
        in ``out_dtype`` (default: each parameter's dtype), accumulated in float32."""
        raise NotImplementedError


class DenseGradients(DPModule):
    """A DP layer that materialises its per-example gradients: the recorded payload is {parameter name:
    (B, *shape) float32}. Norms are sums of squares; the step is the fused clip-sum-noise per parameter
    (``functional.clip_sum_noise``). For small parameters: norm layers, the fallback."""

    def dp_sq_norms(self, *per_example: torch.Tensor, method: str, backend: Optional[str]) -> torch.Tensor:
        # ``method`` is the linear layers' norm method: per-example gradients here are materialised
        return sum(g.reshape(g.shape[0], -1).square().sum(dim=1) for g in per_example)

    def dp_use(self, payload: Dict[str, torch.Tensor], name: str) -> Any:
        from ..engine.ties import DenseUse

        return DenseUse(payload[name])

    def dp_clipped_grads(
        self,
        payload: Dict[str, torch.Tensor],
        clip_factors: torch.Tensor,
        noise_std: float,
        keys: Dict[str, PhiloxKey],
        backend: Optional[str],
        out_dtype: Optional[torch.dtype] = None,
    ) -> Dict[str, torch.Tensor]:
        from .. import functional

        grads = {}
        for name, key in keys.items():
            if name not in payload:
                raise RuntimeError(f"internal: {type(self).__name__} recorded no per-example gradient for '{name}'")
            param = getattr(self, name)
            total = functional.clip_sum_noise(
                payload[name], clip_factors, noise_std=noise_std, generator=key, backend=backend
            )
            grads[name] = total.view(param.shape).to(out_dtype or param.dtype)
        return grads


_COMBINED: Dict[Tuple[type, ...], type] = {}


def combined_class(*bases: type, name: Optional[str] = None) -> type:
    """The class ``name(*bases)`` (built once per tuple of bases), for turning a library's layer into its
    DP version in place: ``module.__class__ = combined_class(DPMixin, type(module))`` keeps the
    object, its parameters, hooks and state_dict, and ``isinstance`` with the library's class. The
    class is published in the module of its first dpkernels base, so models holding it pickle."""
    cls = _COMBINED.get(bases)
    if cls is None:
        import sys

        ours = next((b for b in bases if b.__module__.startswith("dpkernels")), bases[0])
        library = next((b for b in bases if not b.__module__.startswith("dpkernels")), bases[-1])
        name = name or f"DP{library.__name__}"
        home = sys.modules[ours.__module__]
        if getattr(home, name, None) is not None:
            name = f"{name}_{library.__module__.split('.')[0]}"
        if getattr(home, name, None) is not None:
            name = f"{name}_{len(_COMBINED)}"
        cls = type(name, bases, {"__module__": ours.__module__, "__qualname__": name})
        setattr(home, name, cls)
        _COMBINED[bases] = cls
    return cls


def become(module: nn.Module, *bases: type) -> nn.Module:
    """``module`` itself, now of class ``combined_class(*bases)`` (see there)."""
    module.__class__ = combined_class(*bases)
    return module
