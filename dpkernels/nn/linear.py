"""DPLinear: a drop-in nn.Linear with a fused per-example clipping path.

``LinearPath`` is that path for any layer computing y = x Wᵀ + b, whatever orientation it
stores W in: DPLinear (W as (out, in)) and transformers' GPT-2 ``Conv1D`` (W as (in, out),
``dpkernels.integrations.transformers``) share it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import functional
from ..autograd.linear import DPLinearFunction
from ..ops.philox import PhiloxKey
from .module import DPModule
from .registry import register_dp_layer


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for devices autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


class LinearPath(DPModule):
    """The per-example path of a linear layer with parameters ``weight`` and ``bias`` (or None).

    ``_weight_transposed``: the parameter stores Wᵀ, (in, out), as transformers' Conv1D does; the
    kernels see W = weight.t() (a view) and the clipped gradient is transposed back.
    """

    _weight_transposed = False

    def _bias_trainable(self) -> bool:
        return self.bias is not None and self.bias.requires_grad

    def dp_unsupported_reason(self) -> Optional[str]:
        if self._bias_trainable() and not self.weight.requires_grad:
            return "a trainable bias with a frozen weight is not supported; freeze the bias too or unfreeze the weight"
        return None

    def _linear_private(self) -> bool:
        return self.dp_private_forward() and self.weight.requires_grad

    def _linear_forward(self, input: torch.Tensor) -> torch.Tensor:
        """y = x Wᵀ + b through DPLinearFunction: backward records (x, G) and returns no weight gradient."""
        if input.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} needs batched input of shape (B, d) or (B, *, d) under private training, "
                f"got {tuple(input.shape)}"
            )
        collector = self._dp_collector.for_module(self)
        # batch_first=False: (T, B, ..., d) inputs carry the batch on dimension 1; (B, d) stays (B, d)
        batch_dim = 0 if collector.step.batch_first or input.dim() < 3 else 1
        (input,), (layout,) = self.dp_examples(input, batch_dim=batch_dim)
        weight = self.weight.t() if self._weight_transposed else self.weight
        bias = self.bias
        device_type = input.device.type
        if _autocast_enabled(device_type):
            # do autocast's cast here, so that the saved input, the output gradient and the
            # per-example norms all see the dtype the matmul ran in
            dtype = torch.get_autocast_dtype(device_type)
            input, weight = input.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return DPLinearFunction.apply(input, weight, bias, collector, layout)

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
        if with_bias and noise_std != 0.0 and keys["bias"].stream != keys["weight"].stream + 1:
            raise RuntimeError("internal: the bias noise stream must follow the weight's (stream + 1)")
        grad_w, grad_b = functional.linear_clipped_grad(
            x,
            grad_output,
            clip_factors,
            bias=with_bias,
            noise_std=noise_std,
            generator=keys["weight"],
            backend=backend,
            out_dtype=out_dtype or self.weight.dtype,
        )
        grads = {"weight": grad_w.t().contiguous() if self._weight_transposed else grad_w}
        if grad_b is not None:
            grads["bias"] = grad_b
        return grads

    def dp_use(self, payload: Any, name: str) -> Any:
        from ..engine.ties import DenseUse, LinearUse

        x, grad_output = payload
        if name == "bias":
            g = grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])
            return DenseUse(g.sum(dim=1, dtype=torch.float32))
        # Wᵀ stored (Conv1D): the gradient of the parameter is xᵀG, a linear use with x and G swapped
        return LinearUse(grad_output, x) if self._weight_transposed else LinearUse(x, grad_output)

    def dp_sq_norms(
        self, x: torch.Tensor, grad_output: torch.Tensor, method: str, backend: Optional[str]
    ) -> torch.Tensor:
        return functional.linear_sq_norms(x, grad_output, bias=self._bias_trainable(), method=method, backend=backend)


@register_dp_layer(nn.Linear)
class DPLinear(nn.Linear, LinearPath):
    """``nn.Linear`` (same constructor, same parameters, same state_dict) for DP training.

    Outside a private engine it is exactly nn.Linear. Attached to one (``make_private``), its
    backward reports per-example squared gradient norms (weight and bias together) computed by
    the fused kernels of ``functional.linear_sq_norms`` and defers the weight gradient to the
    engine's fused clip-accumulate-noise pass. Input (B, d) or (B, *, d); with
    ``make_private(..., batch_first=False)``, (T, B, *, d) (the batch on dimension 1) or (B, d);
    with a declared flattened layout (``dpkernels.nn.declare_flattened``), (B·R, d).
    """

    @classmethod
    def dp_from(cls, linear: nn.Linear) -> "DPLinear":
        """A DPLinear sharing ``linear``'s Parameter objects (optimizers keep pointing at them)."""
        return cls.adopt(linear, ("in_features", "out_features"), ("weight", "bias"))

    from_linear = dp_from

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._linear_private():
            return F.linear(input, self.weight, self.bias)
        return self._linear_forward(input)
