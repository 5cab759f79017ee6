"""The contract between a DP layer and the engine.

A DP module owns some trainable parameters and, when attached to an engine's collector,
reports per-example squared norms during backward and writes its parameters' clipped,
noised gradients at step time. Outside an engine it behaves exactly like its torch parent.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..ops.philox import PhiloxKey


class DPModule:
    """Mixin for layers with a per-example clipping path (see DPLinear)."""

    _dp_collector: Optional[Any] = None

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
        """Whether this forward call must go through the per-example path."""
        return self._dp_collector is not None and torch.is_grad_enabled()

    def dp_sq_norms(self, *norm_inputs: torch.Tensor, method: str, backend: Optional[str]) -> torch.Tensor:
        """float32 (B,): Σ over this module's trainable parameters of ‖per-example gradient‖²,
        from the tensors its autograd function hands to ``ModuleCollector.record``."""
        raise NotImplementedError

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
