"""Data-parallel private training over several processes: one path for ``distributed=True``, DDP and FSDP2.

Each rank holds a disjoint shard of the data, Poisson-sampled with the same rate q, so the union
of the ranks' batches is one Poisson batch of the whole data set (expected size B̄ = q·N, the
``expected_batch_size`` every rank passes). Clip factors are per example, so each rank computes
those of its own examples (an example's gradient is whole on its rank: no communication for the
norms). A step is

    rank r:     S_r = Σ_{i in rank r's batch} c_i g_i / B̄                  (its own examples)
    rank r:     adds σC/B̄ · z[e] for the elements e it *owns* (below), once per element
    all ranks:  p.grad = Σ_r (S_r + own noise)     all-reduce (replicated parameter) or
                                                   reduce-scatter (FSDP2-sharded parameter)

so every rank applies exactly the update one process would apply to the union batch, noise
included: z[e] is the Philox draw of element e of the parameter (seed, step, parameter stream),
and each element is drawn by exactly one rank.

Who owns which element, for a parameter of n elements on W ranks:

    replicated (plain tensor: distributed=True, DDP, a parameter FSDP2 does not manage)
        rank r owns the contiguous range [r·⌈n/W⌉, min(n, (r+1)·⌈n/W⌉)) and adds its noise
        before the all-reduce (so the noise costs every rank 1/W of the draw)
    sharded (FSDP2, Shard(0) on a 1-D mesh: dpkernels.engine.fsdp)
        rank r owns its shard, rows [r·⌈d₀/W⌉, min(d₀, (r+1)·⌈d₀/W⌉)) of dimension 0, which is the
        contiguous flat range starting at row_start·(n/d₀) of the unsharded parameter; it adds the
        noise to its shard after the reduce-scatter, drawn at that offset
        (``functional.gaussian_noise(offset=)``), so no rank ever holds more noise than its shard

Clipped sums are reduced, never per-example or unclipped gradients: the private layers hand no
gradient to autograd (the engine writes .grad), DDP's gradient hooks are switched off by
``make_private`` (``require_backward_grad_sync = False``: its reducer never runs), and FSDP2 reduces
only what the engine hands it (per-layer clipping, inside backward) or nothing at all (flat
clipping: the engine reduce-scatters at the step).

Failures: before anything is reduced the ranks agree on whether every rank computed its share
(one all-reduce of a flag); a failure on one rank (a NaN norm, a batch-size refusal, a refusal
inside backward, which is deferred to the step on a rank of several so that no rank leaves the
others waiting in a collective) makes every rank refuse the step instead of hanging in the sum or
updating without that rank's examples.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import functional
from ..ops.philox import PhiloxKey

KeyOf = Callable[[nn.Parameter, str], PhiloxKey]


def owned_range(numel: int, rank: int, world_size: int) -> Tuple[int, int]:
    """The elements [start, stop) of a replicated parameter of ``numel`` elements whose noise ``rank``
    draws: chunk ``rank`` of ⌈numel / world_size⌉ (empty on the last ranks when numel is small)."""
    chunk = -(-numel // world_size)
    start = min(numel, rank * chunk)
    return start, min(numel, start + chunk)


class RankGroup:
    """The processes one private model is trained by (a single one unless ``distributed``), and how
    their clipped sums and noise shares meet: ``deliver`` each parameter's local clipped sum, then
    ``flush`` (the reductions). With FSDP2, ``sharding`` (``dpkernels.engine.fsdp.FSDPSharding``)
    takes the parameters it shards."""

    def __init__(self, distributed: bool, group: Any = None, *, ddp: Optional[nn.Module] = None) -> None:
        self.distributed = bool(distributed)
        self.group = group
        self.ddp = ddp
        self.sharding: Any = None  # set by make_private for an FSDP2 model
        self._pending: List[Tuple[str, nn.Parameter, torch.Tensor]] = []  # replicated: (name, param, fp32 sum)
        if not self.distributed:
            self.rank, self.world_size = 0, 1
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "make_private(distributed=True) needs torch.distributed initialised first "
                "(torch.distributed.init_process_group), one process per rank"
            )
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    def shard_with(self, sharding: Any) -> None:
        """Train an FSDP2 model: its units' process group is the ranks', ``sharding`` takes their parameters."""
        self.sharding = sharding
        self.group, self.rank, self.world_size = sharding.group, sharding.rank, sharding.world_size

    @property
    def draws_noise(self) -> bool:
        """Whether this process draws all of the noise itself, inside the fused kernels (a single
        process). Across ranks each rank adds its share at the reduction instead (module docstring)."""
        return not self.distributed

    # ---- what the optimizer asks -------------------------------------------------------
    def canonical(self, param: torch.Tensor) -> torch.Tensor:
        """The parameter the optimizer knows for ``param``: itself, or under FSDP2 the sharded
        parameter behind an unsharded one (what a module holds during forward and backward)."""
        return param if self.sharding is None else self.sharding.canonical(param)

    def preflight(self, pending_modules: Sequence[nn.Module] = ()) -> None:
        """Refuse, naming the setting, a configuration changed since make_private that would reduce an
        unclipped gradient or scale the clipped sum (called before every step's agreement; ``pending_modules``:
        the layers whose records are still to be clipped)."""
        if self.ddp is not None and (self.ddp.require_backward_grad_sync or self.ddp.require_forward_param_sync):
            raise RuntimeError(
                "the DistributedDataParallel model's gradient synchronisation was switched back on after "
                "make_private (require_backward_grad_sync / require_forward_param_sync): DDP would all-reduce "
                "gradients the engine has not clipped; leave them False (make_private sets them)"
            )
        if self.sharding is not None:
            self.sharding.preflight(pending_modules)

    def _device(self, like: torch.Tensor) -> torch.device:
        import torch.distributed as dist

        return like.device if dist.get_backend(self.group) != "gloo" else torch.device("cpu")

    def all_succeeded(self, ok: bool, device: torch.device) -> bool:
        """True when ``ok`` holds on every rank (one all-reduce of a flag; no collective alone)."""
        if not self.distributed:
            return ok
        return self.any_rank(not ok, device) is False

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on some rank (one all-reduce of an int32, MAX)."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        t = t.to(self._device(t))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def broadcast_module(self, module: nn.Module) -> None:
        """Give every rank rank 0's replicated parameters and buffers (what DDP does at construction);
        FSDP2's sharded parameters are one tensor across the ranks already, and are left alone."""
        if not self.distributed:
            return
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                if isinstance(t, DTensor):
                    continue
                staged = t.detach().to(self._device(t))
                dist.broadcast(staged, src=src, group=self.group)
                t.copy_(staged)

    # ---- the reduction of a step -------------------------------------------------------
    def deliver(
        self,
        name: str,
        param: nn.Parameter,
        local_sum: Optional[torch.Tensor],
        key_of: KeyOf,
        noise_std: float,
        backend: Optional[str],
    ) -> None:
        """This rank's clipped sum of ``param`` for the step (None: no example of this rank touched it).

        One process: it holds the noise already (the fused kernels drew it) and becomes the gradient.
        Across ranks: FSDP2-sharded parameters go to ``sharding``; a replicated one waits for ``flush``."""
        if not self.distributed:
            param.grad = local_sum.to(param.dtype)
            return
        if self.sharding is not None and self.sharding.shards(param):
            self.sharding.deliver(name, param, local_sum, key_of, noise_std, backend)
            return
        g = torch.zeros(param.shape, dtype=torch.float32, device=param.device) if local_sum is None else local_sum
        self._pending.append((name, param, g.float()))

    def flush(self, key_of: KeyOf, noise_std: float, backend: Optional[str]) -> None:
        """Reduce what ``deliver`` left: every replicated parameter's sum plus this rank's noise share,
        summed over the ranks (one all-reduce per dtype), cast to the parameter's dtype."""
        if self.sharding is not None:
            self.sharding.flush(key_of, noise_std, backend)
        pending, self._pending = self._pending, []
        if not pending:
            return
        for name, param, g in pending:
            start, stop = owned_range(g.numel(), self.rank, self.world_size)
            if noise_std != 0.0 and stop > start:
                flat = g.view(-1)
                flat[start:stop] += functional.gaussian_noise(
                    (stop - start,),
                    std=noise_std,
                    generator=key_of(param, name),
                    device=g.device,
                    dtype=torch.float32,
                    backend=backend,
                    offset=start,
                )
        self.sum_([g for _, _, g in pending])
        for _, param, g in pending:
            param.grad = g.to(param.dtype)

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
            dist.all_reduce(staged, group=self.group)
            flat = staged.to(flat.device)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def end_step(self) -> None:
        """A logical step is over (taken, refused or zeroed)."""
        self._pending = []
        if self.sharding is not None:
            self.sharding.end_step()

    # ---- per-layer clipping inside backward --------------------------------------------
    def hand_over(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Give FSDP2 the clipped sums of ``module``'s sharded parameters, computed inside backward, for
        its own reduce-scatter (which overlaps backward); returns the sums it did not take."""
        if self.sharding is None:
            return grads
        return self.sharding.hand_over(module, grads)
