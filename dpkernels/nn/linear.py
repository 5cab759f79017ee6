"""DPLinear: a drop-in nn.Linear with a fused per-example clipping path."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import functional
from ..autograd.linear import DPLinearFunction
from ..ops.philox import PhiloxKey
from .module import DPModule


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for devices autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


class DPLinear(nn.Linear, DPModule):
    """``nn.Linear`` (same constructor, same parameters, same state_dict) for DP training.

    Outside a private engine it is exactly nn.Linear. Attached to one (``make_private``), its
    backward reports per-example squared gradient norms (weight and bias together) computed by
    the fused kernels of ``functional.linear_sq_norms`` and defers the weight gradient to the
    engine's fused clip-accumulate-noise pass. Input (B, d) or (B, *, d); with
    ``make_private(..., batch_first=False)``, (T, B, *, d) (the batch on dimension 1) or (B, d).
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DPLinear":
        """A DPLinear sharing ``linear``'s Parameter objects (optimizers keep pointing at them)."""
        return cls.adopt(linear, ("in_features", "out_features"), ("weight", "bias"))

    def dp_unsupported_reason(self) -> Optional[str]:
        if self._bias_trainable() and not self.weight.requires_grad:
            return "a trainable bias with a frozen weight is not supported; freeze the bias too or unfreeze the weight"
        return None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.dp_private_forward() and self.weight.requires_grad):
            return F.linear(input, self.weight, self.bias)
        if input.dim() < 2:
            raise ValueError(
                f"DPLinear needs batched input of shape (B, d) or (B, *, d) under private training, "
                f"got {tuple(input.shape)}"
            )
        collector = self._dp_collector.for_module(self)
        # batch_first=False: (T, B, ..., d) inputs carry the batch on dimension 1; (B, d) stays (B, d)
        batch_dim = 0 if collector.step.batch_first or input.dim() < 3 else 1
        if input.shape[batch_dim] == 0:
            raise ValueError(
                "empty batch reached DPLinear: with Poisson sampling call optimizer.noise_only_step() "
                "for an empty batch instead of running the model"
            )
        weight, bias = self.weight, self.bias
        device_type = input.device.type
        if _autocast_enabled(device_type):
            # do autocast's cast here, so that the saved input, the output gradient and the
            # per-example norms all see the dtype the matmul ran in
            dtype = torch.get_autocast_dtype(device_type)
            input, weight = input.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return DPLinearFunction.apply(input, weight, bias, collector, batch_dim)

    def dp_clipped_grads(
        self,
        payload: Any,
        clip_factors: torch.Tensor,
        noise_std: float,
        keys: Dict[str, PhiloxKey],
        backend: Optional[str],
        out_dtype: Optional[torch.dtype] = None,
    ) -> Dict[str, torch.Tensor]:
        x, grad_output = payload
        with_bias = self._bias_trainable()
        if with_bias and keys["bias"].stream != keys["weight"].stream + 1:
            raise RuntimeError("internal: the bias noise stream must follow the weight's (stream + 1)")
        grad_w, grad_b = functional.linear_clipped_grad(
            x, grad_output, clip_factors, bias=with_bias,
            noise_std=noise_std, generator=keys["weight"], backend=backend, out_dtype=out_dtype or self.weight.dtype,
        )
        grads = {"weight": grad_w}
        if grad_b is not None:
            grads["bias"] = grad_b
        return grads

    def dp_sq_norms(self, x: torch.Tensor, grad_output: torch.Tensor, method: str, backend: Optional[str]) -> torch.Tensor:
        return functional.linear_sq_norms(x, grad_output, bias=self._bias_trainable(), method=method, backend=backend)

    def _bias_trainable(self) -> bool:
        return self.bias is not None and self.bias.requires_grad
