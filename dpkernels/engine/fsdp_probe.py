"""The guard's probe on an FSDP2 model, without collectives that only some ranks would run.

The guard's probe (``dpkernels.engine.probe``) runs extra forwards and backwards of the model the
first time a batch has two examples or more (and again when a layer shows a layout not yet proven),
on the ranks where that holds. Under FSDP2 every forward and backward all-gathers parameters: a
probe on some ranks only would pair their all-gathers with the other ranks' next collectives. So
before every training forward (while any rank may still probe) and after it (where the guard
probes layers seen in a new layout) the ranks agree, with one all-reduce of a flag, whether any of
them may probe; if so every rank gathers every unit with resharding and gradient reduction off,
the probing ranks probe without any collective, and the units are resharded (all but a root whose
forward is in progress) with FSDP2's settings and per-iteration bookkeeping (the forward order its
backward prefetching follows, its training states) restored. The cost: once, the unsharded
parameters of the whole model on every rank, and one all-reduce of an int per training forward.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .fsdp import param_groups


class ProbeBracket:
    """Hooks around the guard's on the FSDP2 model: agree, gather, let the guard probe, reshard (module docstring)."""

    def __init__(self, model: nn.Module, guard: Any, ranks: Any, units: Sequence[nn.Module]) -> None:
        self.model = model
        self.guard = guard
        self.ranks = ranks
        self.units = list(units)
        self._pre_probe_possible = True
        self._saved: Optional[Dict[str, Any]] = None
        self._handles: List[Any] = []

    def attach_before_guard(self) -> None:
        self._handles += [
            self.model.register_forward_pre_hook(self._before_pre_probe, with_kwargs=True),
            self.model.register_forward_hook(self._before_post_probe, always_call=True),
        ]

    def attach_after_guard(self) -> None:
        self._handles += [
            self.model.register_forward_pre_hook(self._close),
            self.model.register_forward_hook(self._close_after_forward, always_call=True),
        ]

    def _device(self) -> torch.device:
        p = next(iter(self.model.parameters()))
        return p.device

    def _outer_call(self, depth_before_guard: int) -> bool:
        return self.guard.mode == "train" and self.guard._in_forward == depth_before_guard

    def _before_pre_probe(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not (self._pre_probe_possible and torch.is_grad_enabled() and self._outer_call(0)):
            return None
        if self.ranks.any_rank(not self.guard.probe_complete, self._device()):
            self._open()
        else:
            self._pre_probe_possible = False  # every rank has completed the probe: it never runs again
        return None

    def _before_post_probe(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not (torch.is_grad_enabled() and self._outer_call(1)):
            return None
        if self.ranks.any_rank(bool(self.guard.unproven), self._device()):
            self._open()
        return None

    def _open(self) -> None:
        """Gather every unit (all-gathers, in the same order on every rank) with resharding and gradient
        reduction off; remember FSDP2's per-iteration bookkeeping (forward order for backward prefetching,
        training states), which the probe's extra forwards and backwards change on probing ranks only."""
        groups = [pg for unit in self.units for pg in param_groups(unit)]
        states = [unit._get_fsdp_state() for unit in self.units]
        contexts = {id(st._state_ctx): st._state_ctx for st in states}
        comms = {id(pg.comm_ctx): pg.comm_ctx for pg in groups if hasattr(pg.comm_ctx, "post_forward_order")}
        self._saved = {
            "groups": [
                (
                    pg,
                    pg.post_forward_mesh_info,
                    pg.reshard_after_backward,
                    pg.reduce_grads,
                    pg.all_reduce_grads,
                    list(pg._post_forward_indices),
                    pg._training_state,
                )
                for pg in groups
            ],
            "states": [(st, st._training_state) for st in states],
            "roots": [(ctx, ctx.iter_forward_root) for ctx in contexts.values()],
            "orders": [(comm, list(comm.post_forward_order)) for comm in comms.values()],
        }
        for pg in groups:
            pg.post_forward_mesh_info = None
            pg.reshard_after_backward = False
            pg.reduce_grads = False
            pg.all_reduce_grads = False
        for unit in self.units:
            unit.unshard()

    def _close(self, *args: Any) -> None:
        if self._saved is None or self.guard.mode != "train":  # not inside the probe's own calls of the model
            return None
        saved, self._saved = self._saved, None
        for pg, mesh_info, after_backward, reduce_grads, all_reduce_grads, indices, training in saved["groups"]:
            pg.post_forward_mesh_info = mesh_info
            pg.reshard_after_backward = after_backward
            pg.reduce_grads = reduce_grads
            pg.all_reduce_grads = all_reduce_grads
            pg._post_forward_indices[:] = indices
            pg._training_state = training
        for st, training in saved["states"]:
            st._training_state = training
        for ctx, root in saved["roots"]:
            ctx.iter_forward_root = root
        for comm, order in saved["orders"]:
            comm.post_forward_order[:] = order
        for unit in self.units:
            if unit is not self.model:  # the root's forward is in progress (or its parameters stay gathered)
                unit.reshard()
        return None

    def _close_after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        return self._close()
