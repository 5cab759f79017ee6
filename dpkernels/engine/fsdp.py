"""FSDP2 (``torch.distributed.fsdp.fully_shard``): private training of a sharded model.

FSDP2 keeps each parameter as a DTensor sharded along dimension 0 over a 1-D mesh of W ranks:
rank r holds rows [r·c, min(d₀, (r+1)·c)) with c = ⌈d₀/W⌉ (fewer on the last ranks, none where
d₀ < W·c leaves nothing), which is the contiguous flat range of elements

    [row_start · m, (row_start + rows) · m)        m = elements per row (numel / d₀)

of the unsharded parameter. Before a unit's forward FSDP2 all-gathers its parameters and puts the
unsharded tensors on the modules; after its backward it reduce-scatters whatever gradient those
unsharded tensors hold into the sharded parameters' .grad. The private path works with that:

- **Norms** need no communication: an example is whole on its rank, and the DP layers compute its
  norm from their own input and output gradient during backward.
- **Flat, automatic and group-wise clipping** need every layer's norm first, so nothing is clipped
  inside backward and FSDP2 is handed nothing (the DP layers give autograd no weight gradient; a
  gradient reaching an unsharded parameter otherwise is refused by a hook before FSDP2 sees it). At
  ``step()`` the engine forms each parameter's clipped sum on its rank, unsharded, and as soon as
  every DP parameter of an FSDP2 unit has its sum, reduce-scatters the unit's sums (float32, the
  padded layout FSDP2 uses) and frees them: on top of per-layer clipping this costs the (x, G) the
  layers keep until the step, one unit's unsharded float32 sums at a time, and the same bytes of
  reduce-scatter, not overlapped with backward (``bench/bench_distributed.py`` measures both).
  With ``accumulate()`` the running sum between micro-batches is unsharded float32 (the model's
  size on every rank); per-layer clipping accumulates in the shards instead.
- **Per-layer clipping** clips each layer inside its backward (``DPOptimizer._clip_in_backward``)
  and hands the clipped sum to FSDP2 as the unsharded parameter's .grad (``hand_over``): FSDP2's own
  reduce-scatter, overlapped with the rest of backward, sums the ranks' clipped sums into the
  shards. ``make_private`` sets every unit to reduce by plain summation (gradient divide factor 1,
  sum reductions) and to reduce-scatter zeros for a parameter whose layer did not run on a rank (so
  the ranks' collectives always match); ``preflight`` refuses a step where any of that was changed.
  With a ``MixedPrecisionPolicy`` the unsharded parameter, and so the handed sum, is in
  ``param_dtype`` (bf16: the local clipped sum is rounded to bf16 before FSDP2's float32 reduce, as
  non-private FSDP2 training rounds its gradients); flat clipping reduce-scatters in float32.
- **Noise**: after the reduction, each rank adds to its own shard σC/B̄·z for exactly the elements of
  that shard, drawn at their flat offset in the unsharded parameter
  (``functional.gaussian_noise(offset=)``): the noise of the one-process run with the same seed,
  drawn once per element over all ranks, and never more of it in memory than one shard.

A DP parameter no unit manages (a model whose root is not sharded) is a replicated parameter of
``engine/distributed.py``: all-reduced, its noise drawn by ranges. Every rank must run the same
forwards and backwards, as FSDP2 itself requires: a rank with no examples for a (micro-)batch runs
the model on public padding rows after ``optimizer.mark_padding()`` (clip factors 0), or calls
``optimizer.noise_only_step(closure)``. The guard's probe runs extra forwards and backwards on some
ranks only; ``engine/fsdp_probe.py`` keeps FSDP2's collectives out of it.

Refused by name: FSDP1 (``FullyShardedDataParallel``), a mesh of more than one dimension (HSDP, or
FSDP over tensor parallelism), a placement other than Shard(0), units on different process groups,
DTensor parameters FSDP2 does not manage, layers converted after ``fully_shard`` (FSDP2 would gather
into the old modules), and at each step any setting above changed or an unsharded gradient that
FSDP2 did not reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import functional

KeyOf = Callable[[nn.Parameter, str], Any]


def fsdp_module_class() -> Optional[type]:
    import torch.distributed as dist

    if not dist.is_available():  # a torch built without torch.distributed
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule


def fsdp_modules(model: nn.Module) -> List[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to, in ``model.modules()`` order."""
    cls = fsdp_module_class()
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def refuse_fsdp1(model: nn.Module) -> None:
    if fsdp_module_class() is None:
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    for name, m in model.named_modules():
        if isinstance(m, FullyShardedDataParallel):
            raise ValueError(
                f"module '{name or '<root>'}' is wrapped in FullyShardedDataParallel (FSDP1), whose flat parameters "
                "and gradient reduction bypass per-example clipping; shard the model with FSDP2 "
                "(torch.distributed.fsdp.fully_shard) after dpkernels.nn.convert(model)"
            )


# FSDP2 internals this module reads or sets (torch 2.13); checked at make_private so that another
# torch release fails there, by name, rather than in the middle of a step
_PARAM_GROUP_ATTRS = (
    "fsdp_params",
    "gradient_divide_factor",
    "force_sum_reduction_for_comms",
    "reduce_grads",
    "all_reduce_grads",
    "post_forward_mesh_info",
    "reshard_after_backward",
    "_post_forward_indices",
    "_training_state",
    "comm_ctx",
)
_FSDP_PARAM_ATTRS = ("sharded_param", "mesh_info", "fsdp_placement", "unsharded_accumulated_grad")
_MODULE_METHODS = ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms", "unshard", "reshard")


def require_fsdp_internals(units: Sequence[nn.Module]) -> None:
    """Refuse, naming what is missing, a torch whose FSDP2 lacks what this module relies on."""
    missing = set()
    for unit in units:
        missing.update(f"FSDPModule.{m}" for m in _MODULE_METHODS if not hasattr(unit, m))
        state = unit._get_fsdp_state()
        missing.update(f"FSDPState.{a}" for a in ("_training_state", "_state_ctx") if not hasattr(state, a))
        for pg in param_groups(unit):
            missing.update(f"FSDPParamGroup.{a}" for a in _PARAM_GROUP_ATTRS if not hasattr(pg, a))
            for fp in pg.fsdp_params:
                missing.update(f"FSDPParam.{a}" for a in _FSDP_PARAM_ATTRS if not hasattr(fp, a))
    if missing:
        raise RuntimeError(
            f"dpkernels' FSDP2 support relies on FSDP2 internals that torch {torch.__version__} does not have: "
            f"{', '.join(sorted(missing))} (it is tested with torch 2.13); use DDP or distributed=True"
        )


def param_groups(module: nn.Module) -> List[Any]:
    """FSDP2's parameter groups of a ``fully_shard``-ed module (one, or several with fully_shard([a, b]))."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch releases with a single group per state
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def modules_inside(units: Sequence[nn.Module]) -> Dict[int, nn.Module]:
    """Every module inside the units, by id (taken before ``convert``, for ``check_not_replaced``)."""
    return {id(m): m for unit in units for m in unit.modules()}


def check_not_replaced(model: nn.Module, units: Sequence[nn.Module], before: Dict[int, nn.Module]) -> None:
    """Refuse a layer that ``convert`` replaced by a new module inside a sharded unit: FSDP2 keeps writing
    the gathered parameters into the module it was given, which is no longer the model's."""
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    now = {id(m): m for m in model.modules()}
    replaced = sorted(
        f"'{n}' ({type(now[i]).__name__})"
        for i, n in names.items()
        if i not in before and any(now[i] in set(u.modules()) for u in units)
    )
    lost = [u for u in units if id(u) not in now]
    if replaced or lost:
        what = ", ".join(replaced) if replaced else ", ".join(type(u).__name__ for u in lost)
        raise ValueError(
            "make_private converted layers of this FSDP2 model after fully_shard, and FSDP2 would keep gathering "
            f"their parameters into the modules they replaced: {what}. Call dpkernels.nn.convert(model) first, "
            "then fully_shard, then build the optimizer and call make_private"
        )


@dataclass(frozen=True)
class Shard:
    """Where this rank's shard of a Shard(0) parameter lies in the unsharded one."""

    rows_total: int  # d₀
    chunk_rows: int  # c = ⌈d₀ / W⌉: the rows of each rank's padded chunk
    row_start: int  # r·c (clamped to d₀)
    rows: int  # rows this rank holds
    row_numel: int  # elements per row

    @property
    def flat_offset(self) -> int:
        """The flat index, in the unsharded parameter, of this shard's first element."""
        return self.row_start * self.row_numel

    @property
    def numel(self) -> int:
        return self.rows * self.row_numel

    @property
    def chunk_numel(self) -> int:
        return self.chunk_rows * self.row_numel


def shard_of(shape: torch.Size, rank: int, world_size: int) -> Shard:
    d0 = int(shape[0]) if len(shape) else 1
    row_numel = 1
    for s in shape[1:]:
        row_numel *= int(s)
    chunk = -(-d0 // world_size)
    start = min(d0, rank * chunk)
    return Shard(d0, chunk, start, min(d0, start + chunk) - start, row_numel)


class _Unit:
    """The DP parameters of one FSDP2 parameter group, reduce-scattered together at the step."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.params: List[nn.Parameter] = []
        self.received: Dict[int, Tuple[str, nn.Parameter, Optional[torch.Tensor]]] = {}


class FSDPSharding:
    """The FSDP2 side of a ``RankGroup``: which parameters are sharded, and their reduction and noise."""

    def __init__(
        self, model: nn.Module, units: Sequence[nn.Module], dp_params: Dict[int, str], clips_in_backward: bool
    ) -> None:
        from torch.distributed.tensor import DTensor

        require_fsdp_internals(units)
        self.clips_in_backward = clips_in_backward
        self.units: List[_Unit] = []
        self._fsdp_param: Dict[int, Any] = {}  # id(sharded param) -> FSDPParam
        self._unit_of: Dict[int, _Unit] = {}
        self._geometry: Dict[int, Shard] = {}
        self._unsharded_to_sharded: Dict[int, nn.Parameter] = {}
        self._stale = True  # the shards' .grad belong to a finished step until the next training forward
        self.group: Any = None
        self.fsdp_units = list(units)
        names = {m: n or "<root>" for n, m in model.named_modules()}
        groups_seen = []
        for unit_module in units:
            for pg in param_groups(unit_module):
                unit = _Unit(names.get(unit_module, type(unit_module).__name__))
                for fp in pg.fsdp_params:
                    p = fp.sharded_param
                    if id(p) not in dp_params:
                        continue
                    self._check_layout(fp, dp_params[id(p)])
                    group = fp.mesh_info.shard_process_group
                    groups_seen.append((dp_params[id(p)], group))
                    self._fsdp_param[id(p)] = fp
                    self._unit_of[id(p)] = unit
                    unit.params.append(p)
                if unit.params:
                    self.units.append(unit)
        self._check_one_group(groups_seen)
        managed = {id(fp.sharded_param) for u in units for pg in param_groups(u) for fp in pg.fsdp_params}
        foreign = [n for n, p in model.named_parameters() if isinstance(p, DTensor) and id(p) not in managed]
        if foreign:
            raise ValueError(
                f"parameters {', '.join(foreign)} are DTensors that FSDP2 does not manage (tensor parallelism?): "
                "only FSDP2's Shard(0) sharding is supported; their noise and reduction cannot be placed"
            )
        for p_id in self._fsdp_param:
            p = self._fsdp_param[p_id].sharded_param
            local = p.to_local()
            shard = shard_of(p.shape, self.rank, self.world_size)
            if tuple(local.shape) != (shard.rows, *p.shape[1:]):
                raise ValueError(
                    f"parameter '{dp_params[p_id]}': this rank holds a shard of shape {tuple(local.shape)}, not the "
                    f"rows [{shard.row_start}, {shard.row_start + shard.rows}) of FSDP2's Shard(0) layout; its noise "
                    "cannot be placed"
                )
            self._geometry[p_id] = shard
        self._names = dict(dp_params)
        self._configure()

    # ---- set-up ------------------------------------------------------------------------
    def _check_layout(self, fp: Any, name: str) -> None:
        mesh = fp.mesh_info.mesh
        if mesh.ndim != 1 or getattr(fp, "is_dtensor", False):
            raise ValueError(
                f"parameter '{name}' is sharded over a {mesh.ndim}-D mesh or a DTensor mesh (HSDP, or FSDP2 over "
                "tensor parallelism): only FSDP2 on a 1-D mesh is supported, where the ranks that shard a "
                "parameter are all the ranks that train"
            )
        placement = fp.fsdp_placement
        if getattr(placement, "dim", None) != 0:
            raise ValueError(
                f"parameter '{name}' is sharded as {placement}, not Shard(0): its shard is not one contiguous "
                "range of the parameter's elements, so its noise cannot be drawn shard by shard; drop "
                "shard_placement_fn"
            )

    def _check_one_group(self, groups_seen: List[Tuple[str, Any]]) -> None:
        import torch.distributed as dist

        if not groups_seen:
            raise ValueError("an FSDP2 model with no trainable DP parameter in any fully_shard unit")
        self.group = groups_seen[0][1]
        ranks0 = dist.get_process_group_ranks(self.group)
        for name, g in groups_seen[1:]:
            if g is not self.group and dist.get_process_group_ranks(g) != ranks0:
                raise ValueError(
                    f"parameter '{name}' is sharded over a different process group than '{groups_seen[0][0]}': "
                    "every fully_shard unit must shard over the same ranks"
                )
        self.rank, self.world_size = self.group.rank(), self.group.size()

    def _configure(self) -> None:
        """Plain sums in FSDP2's reductions; under per-layer clipping, zeros for unused parameters too."""
        for unit_module in self.fsdp_units:
            unit_module.set_gradient_divide_factor(1.0)
            unit_module.set_force_sum_reduction_for_comms(True)
            if self.clips_in_backward:
                if not hasattr(unit_module, "set_reduce_scatter_unused_params"):
                    raise ValueError(
                        "clipping='per_layer' under FSDP2 needs FSDPModule.set_reduce_scatter_unused_params (a rank "
                        f"whose layer did not run must still take part in the reduce-scatter), missing in torch "
                        f"{torch.__version__}; use flat clipping"
                    )
                unit_module.set_reduce_scatter_unused_params(True, recurse=False)

    # ---- identity ----------------------------------------------------------------------
    def shards(self, param: torch.Tensor) -> bool:
        return id(param) in self._fsdp_param

    def canonical(self, param: torch.Tensor) -> torch.Tensor:
        """The sharded parameter behind an unsharded one FSDP2 put on a module (else ``param``)."""
        if id(param) in self._fsdp_param:
            return param
        hit = self._unsharded_to_sharded.get(id(param))
        if hit is not None:
            return hit
        for fp in self._fsdp_param.values():  # unsharded tensors are made at the first all-gather: learn them
            up = getattr(fp, "_unsharded_param", None)
            if up is not None:
                self._unsharded_to_sharded[id(up)] = fp.sharded_param
        return self._unsharded_to_sharded.get(id(param), param)

    def unsharded_params(self, module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
        """(qualified name, tensor) of ``module``'s sharded DP parameters as the module holds them now."""
        out = []
        for p in module.parameters(recurse=False):
            sharded = self.canonical(p)
            if id(sharded) in self._fsdp_param and p is not sharded:
                out.append((self._names[id(sharded)], p))
        return out

    def attach(self, model: nn.Module) -> None:
        """Before the first training forward of a logical step, drop the shards' .grad of the step before:
        FSDP2's reduce-scatter adds into an existing .grad, and no rank may carry a finished step into
        this one (cleared before any backward, so nothing of this step is lost)."""

        def before_forward(module: nn.Module, args: tuple) -> None:
            if self._stale and torch.is_grad_enabled():
                self._stale = False
                for fp in self._fsdp_param.values():
                    fp.sharded_param.grad = None

        self._step_handle = model.register_forward_pre_hook(before_forward, prepend=True)

    def guard_unsharded(
        self,
        dp_modules: Sequence[Tuple[str, nn.Module]],
        hook_for: Callable[[str], Callable[[Optional[torch.Tensor]], None]],
    ) -> None:
        """Refuse any autograd gradient reaching an unsharded DP parameter (it would be reduced unclipped):
        the hook ``hook_for(name)`` on every unsharded tensor, set when a DP layer first runs with it."""
        hooked: Dict[int, torch.Tensor] = {}

        def before_forward(module: nn.Module, args: tuple) -> None:
            for name, t in self.unsharded_params(module):
                if hooked.get(id(t)) is not t:
                    hooked[id(t)] = t
                    t.register_hook(hook_for(name))

        self._hook_handles = [
            m.register_forward_pre_hook(before_forward)
            for _, m in dp_modules
            if any(id(self.canonical(p)) in self._fsdp_param for p in m.parameters(recurse=False))
        ]

    # ---- checks ------------------------------------------------------------------------
    def preflight(self, pending_modules: Sequence[nn.Module]) -> None:
        for unit_module in self.fsdp_units:
            for pg in param_groups(unit_module):
                if pg.gradient_divide_factor != 1.0 or not pg.force_sum_reduction_for_comms:
                    raise RuntimeError(
                        f"FSDP2 unit '{pg._module_fqn or '<root>'}' no longer reduces by plain summation (gradient "
                        "divide factor / sum reduction changed after make_private): the reduced sum would not be the "
                        "clipped sum the noise is calibrated to; leave FSDP2's reduction settings as make_private "
                        "set them"
                    )
                if self.clips_in_backward and not getattr(pg, "reduce_scatter_unused_params", False):
                    raise RuntimeError(
                        f"FSDP2 unit '{pg._module_fqn or '<root>'}' no longer reduce-scatters unused parameters "
                        "(set_reduce_scatter_unused_params changed after make_private): the ranks' reductions "
                        "could mismatch; leave it as make_private set it"
                    )
        late = []
        for p_id, fp in self._fsdp_param.items():
            up = getattr(fp, "_unsharded_param", None)
            if (up is not None and up.grad is not None) or getattr(fp, "unsharded_accumulated_grad", None) is not None:
                late.append(self._names[p_id])
        if late:
            raise RuntimeError(
                f"the unsharded gradients of {', '.join(late)} were not reduced by FSDP2 in this step: a clipped sum "
                "reached FSDP2 after it had reduced the parameter's unit (a DP layer whose backward ran after its "
                "unit's post-backward), or gradient synchronisation was off for the last backward "
                "(set_requires_gradient_sync(False)); no update was made"
            )
        if self.clips_in_backward:
            stuck = [
                f"'{self._names[id(p)]}'"
                for m in pending_modules
                for p in m.parameters(recurse=False)
                if id(self.canonical(p)) in self._fsdp_param
            ]
            if stuck:
                raise RuntimeError(
                    f"parameters {', '.join(stuck)} are shared by layers that did not all run in this backward, so "
                    "their per-layer clipping group could not be clipped inside backward and handed to FSDP2; use flat "
                    "clipping for this model, or run every layer of the tie each step"
                )

    # ---- per-layer clipping: FSDP2 reduces what backward hands it ----------------------
    def hand_over(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        rest = {}
        for n, g in grads.items():
            now = getattr(module, n)
            sharded = self.canonical(now)
            if id(sharded) not in self._fsdp_param:
                rest[n] = g
                continue
            if now is sharded:
                raise RuntimeError(
                    f"parameter '{self._names[id(sharded)]}' was resharded by FSDP2 before its DP layer was clipped "
                    "in backward (its unit's post-backward ran first): its clipped sum can no longer be reduced in "
                    "this step; no update will be made"
                )
            g = g.to(now.dtype)
            now.grad = g if now.grad is None else now.grad.add_(g)
        return rest

    # ---- the step's reduction ----------------------------------------------------------
    def deliver(
        self,
        name: str,
        param: nn.Parameter,
        local_sum: Optional[torch.Tensor],
        key_of: KeyOf,
        noise_std: float,
        backend: Optional[str],
    ) -> None:
        if self.clips_in_backward:
            if local_sum is not None:
                raise RuntimeError(f"internal: a clipped sum of '{name}' at the step under per-layer FSDP2 clipping")
            fresh = param.grad is not None and not self._stale  # else: no forward ran in this step (noise only)
            self._noise_shard(name, param, param.grad.to_local() if fresh else None, key_of, noise_std, backend)
            return
        unit = self._unit_of[id(param)]
        unit.received[id(param)] = (name, param, local_sum)
        if len(unit.received) == len(unit.params):
            self._reduce_unit(unit, key_of, noise_std, backend)

    def flush(self, key_of: KeyOf, noise_std: float, backend: Optional[str]) -> None:
        for unit in self.units:  # every unit is complete after a step's deliveries; this is a safeguard
            if unit.received:
                for p in unit.params:
                    if id(p) not in unit.received:
                        unit.received[id(p)] = (self._names[id(p)], p, None)
                self._reduce_unit(unit, key_of, noise_std, backend)

    def _reduce_unit(self, unit: _Unit, key_of: KeyOf, noise_std: float, backend: Optional[str]) -> None:
        """Reduce-scatter the unit's unsharded sums (float32, FSDP2's padded chunk layout: rank r's part of
        every parameter, one after the other), then add each shard's noise and set the shards' .grad."""
        import torch.distributed as dist

        items = [unit.received.pop(id(p)) for p in unit.params]
        device = unit.params[0].to_local().device
        shards = [self._geometry[id(p)] for _, p, _ in items]
        width = sum(s.chunk_numel for s in shards)
        send = torch.zeros(self.world_size, width, dtype=torch.float32, device=device)
        col = 0
        for (_, _, g), s in zip(items, shards):
            if g is not None:  # rank r's chunk of the parameter (zero-padded past d₀) into row r of ``send``
                padded = torch.zeros(self.world_size * s.chunk_numel, dtype=torch.float32, device=device)
                padded[: s.rows_total * s.row_numel] = g.reshape(-1)
                send[:, col : col + s.chunk_numel] = padded.view(self.world_size, s.chunk_numel)
            col += s.chunk_numel
        items = [(name, p) for name, p, _ in items]  # free the unsharded sums
        gloo = dist.get_backend(self.group) == "gloo"
        staged = send.cpu() if gloo and device.type != "cpu" else send
        received = torch.empty(width, dtype=torch.float32, device=staged.device)
        dist.reduce_scatter_tensor(received, staged.reshape(-1), group=self.group)
        del send, staged
        received = received.to(device)
        col = 0
        for (name, p), s in zip(items, shards):
            local = received[col : col + s.numel].view(s.rows, *p.shape[1:])
            self._noise_shard(name, p, local, key_of, noise_std, backend)
            col += s.chunk_numel

    def _noise_shard(
        self,
        name: str,
        param: nn.Parameter,
        local: Optional[torch.Tensor],
        key_of: KeyOf,
        noise_std: float,
        backend: Optional[str],
    ) -> None:
        """param.grad = (its reduced shard ``local``, zeros if None) + σC/B̄·z over the shard's elements."""
        from torch.distributed.tensor import DTensor

        s = self._geometry[id(param)]
        shape = (s.rows, *param.shape[1:])
        device = param.to_local().device
        out = torch.zeros(shape, dtype=torch.float32, device=device) if local is None else local.float().clone()
        if noise_std != 0.0 and s.numel:
            out += functional.gaussian_noise(
                shape,
                std=noise_std,
                generator=key_of(param, name),
                device=device,
                dtype=torch.float32,
                backend=backend,
                offset=s.flat_offset,
            )
        param.grad = DTensor.from_local(
            out.to(param.dtype),
            device_mesh=param.device_mesh,
            placements=param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )

    # ---- the end of a step -------------------------------------------------------------
    def end_step(self) -> None:
        """Forget unreduced deliveries and any unsharded gradient left over (a refused or zeroed step)."""
        self._stale = True
        for unit in self.units:
            unit.received.clear()
        for fp in self._fsdp_param.values():
            up = getattr(fp, "_unsharded_param", None)
            if up is not None and up.grad is not None:
                up.grad = None
            if getattr(fp, "unsharded_accumulated_grad", None) is not None:
                fp.unsharded_accumulated_grad = None
