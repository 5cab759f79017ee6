"""What one private step gathers during backward: per-layer squared norms and payloads.

Each DP module's autograd function calls ``record`` once per step with the tensors its
clipped-sum pass will need (for a linear layer: x and G), directly in eager code and through the
``dpkernels::record`` op in a compiled backward (``dpkernels.autograd._record``). ``record``
computes the layer's per-example squared norms right away (the fused norm kernels) and keeps the
payload until ``DPOptimizer.step`` turns everything into clipped, noised gradients. Under
per-layer clipping the optimizer's ``sink`` clips each layer as soon as it is recorded and frees
its payload.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..autograd._record import register_site
from ..ops._phases import phase
from .guard import ExampleGuard


class LayerRecord:
    __slots__ = ("module", "payload", "sq_norms")

    def __init__(self, module: nn.Module, payload: Any, sq_norms: torch.Tensor) -> None:
        self.module = module
        self.payload = payload
        self.sq_norms = sq_norms


class ModuleCollector:
    """The handle a DP module's autograd function reports to (its "site"; ``site_id`` finds it from
    a compiled graph)."""

    def __init__(self, step: "StepCollector", module: nn.Module, name: str) -> None:
        self.step = step
        self.module = module
        self.name = name
        self.site_id = register_site(self)

    def record(
        self, payload: Any, *norm_inputs: torch.Tensor, keep: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    ) -> None:
        """The layer's per-example squared norms from ``norm_inputs``, and its ``payload`` kept for the
        step. ``keep``: applied to every tensor of a payload that outlives this call (a compiled
        backward's buffers are copied: the compiler may reuse them once the call returns)."""
        if self.step.guard.mode == "probe":  # the guard's probe runs backward to check gradient flow only
            return
        with phase("dpkernels.norms"):
            sq_norms = self.module.dp_sq_norms(*norm_inputs, method=self.step.norm_method, backend=self.step.backend)
        record = LayerRecord(self.module, payload, sq_norms)
        self.step.add(self.name, record)
        if self.step.sink is not None:  # per-layer clipping: clipped now, the payload freed
            self.step.sink(self.name, record)
        if keep is not None and record.payload is not None:
            record.payload = pytree.tree_map(lambda t: keep(t) if isinstance(t, torch.Tensor) else t, record.payload)


class StepCollector:
    """Per-step state shared by all DP modules of one model."""

    def __init__(
        self,
        module_names: Dict[nn.Module, str],
        norm_method: str,
        backend: Optional[str],
        batch_first: bool = True,
        guard: Optional[ExampleGuard] = None,
    ) -> None:
        self.norm_method = norm_method
        self.backend = backend
        self.batch_first = batch_first
        # which example each layer's rows belong to (engine/guard.py); attached to the model by make_private
        self.guard = guard if guard is not None else ExampleGuard(batch_first)
        self._handles = {m: ModuleCollector(self, m, n) for m, n in module_names.items()}
        self.records: Dict[str, LayerRecord] = {}
        self.batch_size: Optional[int] = None
        # set by the optimizer when it clips each layer inside backward (per-layer clipping)
        self.sink: Optional[Callable[[str, LayerRecord], None]] = None
        # why a compiled backward may not record into this step (make_private sets it where compile is unsupported)
        self.compile_refusal: Optional[str] = None

    def for_module(self, module: nn.Module) -> ModuleCollector:
        return self._handles[module]

    def add(self, name: str, record: LayerRecord) -> None:
        if name in self.records:
            raise RuntimeError(
                f"DP layer '{name}' received a second backward before optimizer.step(): either backward() "
                "ran twice without a step in between, or the layer was used twice in one forward "
                "(weight sharing), which per-example clipping does not support"
            )
        B = record.sq_norms.shape[0]
        if self.guard.batch_size is not None and B != self.guard.batch_size:
            raise RuntimeError(
                f"internal: DP layer '{name}' recorded {B} examples but the model's batch has {self.guard.batch_size}"
            )
        if self.batch_size is None:
            self.batch_size = B
        elif B != self.batch_size:
            raise ValueError(
                f"DP layer '{name}' saw batch size {B} but another layer saw {self.batch_size} in the same "
                f"step: every DP layer must see the batch on dimension {0 if self.batch_first else 1} "
                f"(batch_first={self.batch_first})"
            )
        self.records[name] = record

    def clear(self) -> None:
        self.records = {}
        self.batch_size = None
