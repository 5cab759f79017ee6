"""Data-parallel private training over several processes (torch.distributed), without DDP.

Each rank holds a full copy of the model and a disjoint shard of the data, Poisson-sampled
with the same rate q, so the union of the ranks' batches is one Poisson batch of the whole
data set (expected size B̄ = q·N, the ``expected_batch_size`` every rank passes). A step is

    rank r:     S_r = Σ_{i in rank r's batch} c_i g_i  (+ σ C z on rank 0 only)
    all ranks:  p.grad = (Σ_r S_r) / B̄        one all-reduce (sum) per dtype, then the same update

Clip factors are per example, so they are computed where the example is; the noise is drawn
once, by rank 0, from its own secret seed, and summed in with the clipped gradients: the update
every rank applies is exactly the single-process update of the union batch. DDP itself is not
used: its hooks all-reduce the parameters' .grad during backward, and the private path has
none there (the engine writes .grad, clipped, at step time).

Every collective happens in ``DPOptimizer.step`` / ``noise_only_step`` in the same order on
every rank. Before the gradients are summed, the ranks agree on whether every rank computed its
share (one all-reduce of a flag): a failure on one rank (a NaN norm, a batch-size refusal)
makes every rank refuse the step instead of hanging in the sum or updating without that rank.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn


class RankGroup:
    """The processes one private model is trained by: a single one unless ``distributed``."""

    def __init__(self, distributed: bool) -> None:
        self.distributed = bool(distributed)
        if not self.distributed:
            self.rank, self.world_size = 0, 1
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "make_private(distributed=True) needs torch.distributed initialised first "
                "(torch.distributed.init_process_group), one process per rank"
            )
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def draws_noise(self) -> bool:
        """Whether this rank adds the step's noise (rank 0 alone: the sum then holds it once)."""
        return self.rank == 0

    def _device(self, like: torch.Tensor) -> torch.device:
        import torch.distributed as dist

        return like.device if dist.get_backend() != "gloo" else torch.device("cpu")

    def all_succeeded(self, ok: bool, device: torch.device) -> bool:
        """True when ``ok`` holds on every rank (one all-reduce of a flag; no collective alone)."""
        if not self.distributed:
            return ok
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        flag = flag.to(self._device(flag))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def sum_(self, tensors: List[torch.Tensor]) -> None:
        """Replace every tensor by its sum over the ranks, in place: one all-reduce per dtype."""
        if not self.distributed or not tensors:
            return
        import torch.distributed as dist

        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            staged = flat.to(self._device(flat))
            dist.all_reduce(staged)
            flat = staged.to(flat.device)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def broadcast_module(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (what DDP does at construction)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                staged = t.detach().to(self._device(t))
                dist.broadcast(staged, src=0)
                t.copy_(staged)
