"""DPOptimizer: wraps any torch optimizer so that ``step()`` performs one DP-SGD step.

At ``step()``, from what the DP layers recorded during the single backward pass:

    n_i   = s² Σ_layers ‖g_i^(l)‖²                      (s = B for loss_reduction="mean", else 1)
    c_i   = min(1, C / (√n_i + 1e-6))                    flat clipping (engine/clipping.py)
    p.grad = (Σ_i c_i s g_i + σ C z) / B̄                 for every trainable parameter

computed per layer by the fused clip-accumulate-noise kernels, with the clip factors passed
as c_i·s/B̄ and the noise standard deviation as σC/B̄, so no extra pass over the gradient is
made. B̄ is the expected batch size (Poisson sampling), not the realised one. The wrapped
optimizer's own step then runs on these gradients.

Gradient accumulation (a logical batch larger than what fits at once): after the backward of
each micro-batch but the last, ``accumulate()`` clips that micro-batch's examples (their norms
are complete: an example lives in one micro-batch) and adds Σ_i c_i s g_i / B̄ to a float32
running sum, freeing the layers' (x, G). ``step()`` adds the last micro-batch, the noise once,
and writes the gradients. The result equals one step on the whole logical batch, noise
included (same counters).

Across ranks (``make_private(distributed=True)``, a DDP- or FSDP2-wrapped model) each process
clips its own examples; every parameter's clipped sum goes to ``RankGroup.deliver`` as soon as its
last layer is done, and the ranks' sums are added (all-reduce, or FSDP2's reduce-scatter) with each
element's noise drawn once, by the rank that owns it (``engine/distributed.py``, ``engine/fsdp.py``).

Noise is drawn from the Philox counter (seed, step, stream = parameter index): no two
elements of any step share a draw, and a run is reproducible from its seed. The seed is
never written into ``state_dict`` (it would let a checkpoint's reader subtract the noise).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import functional
from ..ops._phases import phase
from ..ops.philox import PhiloxKey
from .clipping import ClippingPlan, make_plan
from .collector import LayerRecord, StepCollector
from .distributed import RankGroup
from .ties import TieSet

LOSS_REDUCTIONS = ("mean", "sum")


class DPOptimizer(torch.optim.Optimizer):
    """A private view of ``optimizer``; param_groups, state and defaults are the wrapped ones."""

    # GradScaler then hands this optimizer the loss scale (as .grad_scale) instead of trying to
    # unscale gradients that do not exist before step(); step() refuses it with a clear message
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        modules: List[Tuple[str, nn.Module]],
        streams: Dict[int, int],
        param_names: Dict[int, str],
        collector: StepCollector,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        loss_reduction: str,
        seed: int,
        backend: Optional[str] = None,
        accountant: Any = None,
        sample_rate: Optional[float] = None,
        check_finite: bool = True,
        clipping: Optional[ClippingPlan] = None,
        ranks: Optional[RankGroup] = None,
        ties: Optional[TieSet] = None,
    ) -> None:
        # Deliberately no super().__init__: this object owns no parameters of its own.
        self.ranks = ranks if ranks is not None else RankGroup(distributed=False)
        self.original_optimizer = optimizer
        self.dp_modules = modules
        self._streams = streams
        self._param_names = param_names
        self.collector = collector
        self.noise_multiplier = float(noise_multiplier)
        if clipping is None:
            clipping = make_plan("flat", [collector.for_module(m).name for _, m in modules], max_grad_norm)
        elif not math.isclose(clipping.total_norm, max_grad_norm, rel_tol=1e-12):
            raise ValueError(f"max_grad_norm {max_grad_norm} is not the clipping plan's total {clipping.total_norm}")
        self.clipping = clipping
        self.max_grad_norm = clipping.total_norm  # the sensitivity C = sqrt(Σ_k C_k²) the noise is scaled to
        self.expected_batch_size = int(expected_batch_size)
        self.loss_reduction = loss_reduction
        self._seed = seed
        self.backend = backend
        self.accountant = accountant
        self.sample_rate = sample_rate
        self.check_finite = check_finite
        self.steps_taken = 0
        # gradient accumulation: id(param) -> float32 Σ c_i s g_i / B̄ of the micro-batches so far
        self._accumulated: Dict[int, torch.Tensor] = {}
        self._accumulated_examples = 0
        # parameters shared by several DP layers: cross terms in the norms, noise once (engine/ties.py)
        self.ties = ties if ties is not None else TieSet({}, {})
        # (module name, why) of the modules make_private put on the torch.func fallback (nn/fallback.py)
        self.fallback_modules: List[Tuple[str, str]] = []
        self._optimizer_step_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: Dict[int, Callable] = OrderedDict()
        # across ranks, a failure inside backward or accumulate() waits here for the step, where every
        # rank refuses it (raising at once would leave the other ranks waiting in a collective)
        self._deferred: Optional[BaseException] = None
        self._padding = False  # the rows of the current backward are public padding (mark_padding)
        # id(module) -> its trainable (name, canonical parameter) pairs, found once per step
        # (_trainable is asked ~5 times per layer per step; requires_grad is read at its first call)
        self._trainable_memo: Dict[int, List[Tuple[str, nn.Parameter]]] = {}
        if clipping.clips_in_backward:
            collector.sink = self._clip_in_backward

    # ---- the wrapped optimizer's state -------------------------------------------------
    @property
    def param_groups(self) -> List[dict]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: List[dict]) -> None:
        self.original_optimizer.param_groups = groups

    @property
    def state(self) -> Dict:
        return self.original_optimizer.state

    @state.setter
    def state(self, state: Dict) -> None:
        self.original_optimizer.state = state

    @property
    def defaults(self) -> Dict:
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: Dict) -> None:
        self.original_optimizer.defaults = defaults

    def __repr__(self) -> str:
        return (
            f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, "
            f"expected_batch_size={self.expected_batch_size}, loss_reduction={self.loss_reduction!r}, "
            f"optimizer={self.original_optimizer!r})"
        )

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizer": self.original_optimizer.state_dict(), "steps_taken": self.steps_taken}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict["optimizer"])
        self.steps_taken = int(state_dict["steps_taken"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and discard anything recorded or accumulated since the last step."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self._clear_step_state()
        self._deferred = None

    # ---- the private step --------------------------------------------------------------
    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise in the update, σ·C/B̄."""
        return self.noise_multiplier * self.max_grad_norm / self.expected_batch_size

    @property
    def _local_noise_std(self) -> float:
        """The noise the fused kernels add: all of it in one process; none across ranks, where each rank
        adds its share of the elements when the sums are reduced (engine/distributed.py)."""
        return self.noise_std if self.ranks.draws_noise else 0.0

    def add_param_group(self, param_group: dict) -> None:
        raise ValueError(
            "cannot add a parameter group to a DPOptimizer: parameters added after make_private have no "
            "clipping path; build the optimizer with every parameter, then call make_private"
        )

    def _check_param_groups(self) -> None:
        """Refuse to step a parameter that make_private did not give a clipping path."""
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._streams:
                    raise RuntimeError(
                        "the optimizer holds a parameter without a clipping path (added to param_groups after "
                        "make_private); refusing to step it"
                    )

    def _key(self, param: torch.Tensor, name: str) -> PhiloxKey:
        if self.steps_taken >= 2**32:
            raise OverflowError("more than 2**32 private steps with one seed: the noise counter would wrap")
        stream = self._streams.get(id(param))
        if stream is None:
            raise RuntimeError(
                f"parameter '{name}' was frozen when make_private ran and is trainable now: it has no clipping "
                "path; unfreeze before make_private"
            )
        return PhiloxKey(self._seed, self.steps_taken, stream)

    def _trainable(self, module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
        # canonical: under FSDP2 a module holds its unsharded parameters during forward and backward
        found = self._trainable_memo.get(id(module))
        if found is None:
            found = [(n, self.ranks.canonical(p)) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            self._trainable_memo[id(module)] = found
        return found

    def max_plausible_batch_size(self) -> int:
        """The most examples one step may report: B̄ + 8√B̄ + 8. A Poisson batch of mean B̄ exceeds
        it with probability below 1e-8 (Chernoff); a layer counting positions or heads as examples
        usually does, and is refused rather than clipped per position (which would not be private)."""
        Bbar = self.expected_batch_size
        return int(Bbar + 8 * math.sqrt(Bbar) + 8)

    def _check_batch_size(self) -> None:
        B = self._accumulated_examples + (self.collector.batch_size or 0)
        if B > self.max_plausible_batch_size():
            layout = "(B, *, d)" if self.collector.batch_first else "(T, B, *, d)"
            raise ValueError(
                f"the DP layers saw {B} examples in one step but expected_batch_size is {self.expected_batch_size} "
                f"(at most {self.max_plausible_batch_size()} is plausible): either the layers see the batch on another "
                "dimension than the one make_private assumes "
                f"(batch_first={self.collector.batch_first}, inputs {layout}; "
                "a sequence-first model needs batch_first=False), or expected_batch_size is wrong. Clipping per "
                "position instead of per example would not be private; no update was made"
            )

    def _clip_factors(self, records: Dict[str, LayerRecord]) -> Dict[int, torch.Tensor]:
        """Clip factors of each clipping group among ``records``' layers, times s/B̄ (the loss
        scale and the average), ready for the fused kernels."""
        self._check_batch_size()
        scale = float(self.collector.batch_size) if self.loss_reduction == "mean" else 1.0
        group_sq: Dict[int, torch.Tensor] = {}
        for name, record in records.items():
            k = self.clipping.group_of.get(name)
            if k is None:
                params = ", ".join(f"'{self._qualified(record.module, n)}'" for n, _ in self._trainable(record.module))
                raise RuntimeError(
                    f"parameters {params} of DP layer '{name}' were frozen when make_private ran and are trainable "
                    "now: they have no clipping path; unfreeze before make_private"
                )
            group_sq[k] = record.sq_norms if k not in group_sq else group_sq[k] + record.sq_norms
        for name, cross in self.ties.cross_sq_norms(records, self.backend).items():
            k = self.clipping.group_of[name]  # a tie's layers share one group (clipping.make_plan)
            group_sq[k] = group_sq[k] + cross
        factors = {
            k: self.clipping.factors(k, sq * scale**2) * (scale / self.expected_batch_size)
            for k, sq in group_sq.items()
        }
        if self._padding:  # public padding rows (mark_padding): each adds exactly nothing
            factors = {k: torch.zeros_like(f) for k, f in factors.items()}
        return factors

    def _check_finite(self) -> None:
        """Refuse NaN/Inf per-example norms of this (micro-)batch, naming the layer: one host sync.
        (Per-layer clipping has already clipped such layers inside backward, into running sums
        that this refusal then discards: nothing non-finite is ever released.)"""
        records = self.collector.records
        if not self.check_finite or not records:
            return
        if bool(torch.isfinite(torch.stack([r.sq_norms for r in records.values()])).all()):
            return
        for name, record in records.items():
            bad = ~torch.isfinite(record.sq_norms)
            if bool(bad.any()):
                idx = bad.nonzero().flatten()[:8].tolist()
                raise FloatingPointError(
                    f"non-finite per-example gradient norm in DP layer '{name}' (examples {idx}): "
                    "the loss or activations produced NaN/Inf; no update was made"
                )

    def _clipped_sum(
        self,
        module: nn.Module,
        record: LayerRecord,
        factors: Dict[int, torch.Tensor],
        noise_std: float,
        out_dtype: Optional[torch.dtype],
    ) -> Dict[str, torch.Tensor]:
        """The module's Σ_i c_i s g_i / B̄ (+ noise) from its record, whose (x, G) it then frees."""
        params = self._trainable(module)
        keys = {n: self._key(p, self._qualified(module, n)) for n, p in params}
        group = self.clipping.group_of[self._name_of(module)]
        grads = module.dp_clipped_grads(
            record.payload, factors[group], noise_std, keys, self.backend, out_dtype=out_dtype
        )
        record.payload = None  # free this layer's (x, G) before the next layer's gradient exists
        return grads

    def _add_to_running_sum(self, module: nn.Module, grads: Dict[str, torch.Tensor]) -> None:
        for n, p in self._trainable(module):
            if n not in grads:  # handed to FSDP2 inside backward (RankGroup.hand_over)
                continue
            running = self._accumulated.get(id(p))
            self._accumulated[id(p)] = grads[n] if running is None else running.add_(grads[n])

    @torch.no_grad()
    def _clip_in_backward(self, name: str, record: LayerRecord) -> None:
        """Per-layer clipping: clip this layer's examples as soon as its norms exist (called by the
        collector inside backward) and keep only the running sum, not (x, G)."""
        module = record.module
        if self._deferred is not None:  # this step failed earlier in backward on this rank
            record.payload = None
            return
        try:
            if not self._trainable(module):
                record.payload = None
                return
            # a group merged by a tie is clipped once all its layers have recorded (or at the step)
            group = self.clipping.group_of[name]
            members = [n for n, k in self.clipping.group_of.items() if k == group]
            records = {n: self.collector.records.get(n) for n in members}
            if any(r is None or r.payload is None for r in records.values()):
                return
            factors = self._clip_factors(records)
            for r in records.values():
                grads = self._clipped_sum(r.module, r, factors, 0.0, torch.float32)
                self._add_to_running_sum(r.module, self.ranks.hand_over(r.module, grads))
        except BaseException as e:
            self._discard()
            if self.ranks.distributed:
                self._deferred = e
                return
            raise

    @torch.no_grad()
    def write_private_grads(self) -> None:
        """Set every trainable parameter's .grad to its clipped, noised, averaged gradient (in one
        process; across ranks ``step()`` first has the ranks agree that each computed its share).

        Per DP layer with a record, the fused clipped sum (its noise inside the kernel); a
        parameter shared by several layers gets the sum of their clipped sums, with its noise drawn
        once, from its own stream, as does a parameter whose layers were clipped earlier
        (accumulate(), per-layer clipping) or did not run in this batch."""
        self._write_sums(*self._prepare_private_grads())

    def _prepare_private_grads(self) -> Tuple[Dict[str, LayerRecord], Dict[int, torch.Tensor]]:
        """Every check of a step, and the clip factors: the records still to be clipped and their factors.
        Nothing is written, so a failure here leaves every rank free to refuse the step."""
        self._raise_deferred()
        if not self.collector.records and not self._accumulated and not self._accumulated_examples:
            raise RuntimeError(
                "optimizer.step() called without a backward pass since the last step (or zero_grad() "
                "discarded it); for an empty Poisson batch call optimizer.noise_only_step()"
            )
        self._check_finite()
        pending = {n: r for n, r in self.collector.records.items() if r.payload is not None}
        self.ranks.preflight([r.module for r in pending.values()])
        with phase("dpkernels.clip_factors"):
            factors = self._clip_factors(pending) if pending else {}
        if not pending:
            self._check_batch_size()
        return pending, factors

    def _raise_deferred(self) -> None:
        failure, self._deferred = self._deferred, None
        if failure is not None:
            raise failure

    def _write_sums(self, pending: Dict[str, LayerRecord], factors: Dict[int, torch.Tensor]) -> None:
        """Every parameter's clipped sum, handed to ``RankGroup.deliver`` (in one process: its gradient)
        as soon as the last layer using it is done, so that across ranks the sums can be reduced (under
        FSDP2: reduce-scattered and freed, unit by unit) while the next layers' are computed."""
        with phase("dpkernels.clipped_sums"):
            last_use: Dict[int, int] = {}  # id(param) -> index of the last pending layer using it
            for k, (_, module) in enumerate(self.dp_modules):
                if self._name_of(module) in pending:
                    for _, p in self._trainable(module):
                        last_use[id(p)] = k
            sums: Dict[int, torch.Tensor] = {}  # id(param) -> its clipped sum so far
            noised = set()  # the parameters whose noise is already in sums
            for k, (_, module) in enumerate(self.dp_modules):
                params = self._trainable(module)
                record = pending.get(self._name_of(module))
                if not params or record is None:
                    continue
                alone = self.ranks.draws_noise and not any(
                    self.ties.is_tied(p) or id(p) in self._accumulated for _, p in params
                )
                grads = self._clipped_sum(
                    module, record, factors, self._local_noise_std if alone else 0.0, None if alone else torch.float32
                )
                for n, p in params:
                    sums[id(p)] = grads[n] if id(p) not in sums else sums[id(p)].add_(grads[n])
                    if alone:
                        noised.add(id(p))
                for n, p in params:
                    if last_use[id(p)] == k and id(p) in sums:
                        self._release(self._qualified(module, n), p, sums.pop(id(p)), id(p) in noised)
            for name, p in self._unique_params():
                if id(p) not in last_use:
                    self._release(name, p, None, False)
            self.ranks.flush(self._key, self.noise_std, self.backend)

    def _release(self, name: str, p: nn.Parameter, g: Optional[torch.Tensor], noised: bool) -> None:
        """Complete ``p``'s local sum ``g`` (None: no layer of this batch used it) with what was accumulated
        and, in one process, its noise, and deliver it."""
        running = self._accumulated.pop(id(p), None)
        if not noised and self.ranks.draws_noise:
            noise = self._noise_like(
                p, self._key(p, name), torch.float32 if (g is not None or running is not None) else None
            )
            g = noise if g is None else g.add_(noise)
        if running is not None:
            g = running if g is None else running.add_(g)
        self.ranks.deliver(name, p, g, self._key, self.noise_std, self.backend)

    def _unique_params(self) -> List[Tuple[str, nn.Parameter]]:
        """Every trainable parameter of the DP layers once, with its qualified name (a tied one under
        the name of its first layer)."""
        seen: Dict[int, Tuple[str, nn.Parameter]] = {}
        for _, module in self.dp_modules:
            for n, p in self._trainable(module):
                if id(p) not in seen:
                    seen[id(p)] = (self._qualified(module, n), p)
        return list(seen.values())

    @torch.compiler.disable  # eager even under torch.compile: see step()
    @torch.no_grad()  # the recorded x may require grad: no graph may tie the running sum to it
    def accumulate(self) -> None:
        """Clip the examples of the backward just run and add them to this logical step's sum.

        For gradient accumulation: call after the backward of every micro-batch except the last,
        then ``step()`` after the last one. Examples are clipped with their own micro-batch's
        norms (each example's gradient is complete there); the noise is drawn once, in
        ``step()``. With loss_reduction="mean" each micro-batch's loss is the mean over that
        micro-batch: do not divide it by the number of micro-batches. Frees the recorded
        (x, G) of every layer; the running sum takes float32 memory the size of the parameters.
        """
        self._refuse_loss_scaling()
        if not self.collector.records:
            raise RuntimeError(
                "optimizer.accumulate() called without a backward pass since the last step or accumulate()"
            )
        self._check_param_groups()
        try:
            self._raise_deferred()
            self._check_finite()
            pending = {n: r for n, r in self.collector.records.items() if r.payload is not None}
            self.ranks.preflight([r.module for r in pending.values()])
            if pending:
                factors = self._clip_factors(pending)
                for _, module in self.dp_modules:
                    record = pending.get(self._name_of(module))
                    if record is not None and self._trainable(module):
                        self._add_to_running_sum(module, self._clipped_sum(module, record, factors, 0.0, torch.float32))
            else:
                self._check_batch_size()
            self._accumulated_examples += self.collector.batch_size
            self.collector.clear()
            self._padding = False
        except BaseException as e:
            self._discard()  # a half-added micro-batch must not survive into a step
            if self.ranks.distributed:  # step() raises it here, and every rank refuses that step
                self._deferred = e
                return
            raise

    def _name_of(self, module: nn.Module) -> str:
        return self.collector.for_module(module).name

    def _qualified(self, module: nn.Module, param_name: str) -> str:
        prefix = self._name_of(module)
        return f"{prefix}.{param_name}" if prefix else param_name

    def _noise_like(self, p: torch.Tensor, key: PhiloxKey, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return functional.gaussian_noise(
            p.shape,
            std=self._local_noise_std,
            generator=key,
            device=p.device,
            dtype=dtype or p.dtype,
            backend=self.backend,
        )

    def _clear_step_state(self) -> None:
        self._trainable_memo = {}
        self.collector.clear()
        self._accumulated = {}
        self._accumulated_examples = 0
        self._padding = False
        self.ranks.end_step()

    def _discard(self) -> None:
        self._clear_step_state()
        for _, module in self.dp_modules:
            for _, p in self._trainable(module):
                p.grad = None

    def _account(self) -> None:
        """Record the release before it happens: a failure after this over-counts, never under-counts."""
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=1)

    def _finish_step(self) -> None:
        self._clear_step_state()
        self.steps_taken += 1

    def _refuse_loss_scaling(self) -> None:
        if getattr(self, "grad_scale", None) is not None:
            self.collector.clear()
            for attr in ("grad_scale", "found_inf"):  # the scaler's handshake; it cannot remove them after a raise
                self.__dict__.pop(attr, None)
            raise RuntimeError(
                "DPOptimizer does not support torch.amp.GradScaler (float16 loss scaling): per-example norms of "
                "the scaled loss would be clipped at C / scale, and an overflow would have to skip the step, "
                "which depends on the data. Train in bfloat16 (torch.autocast(dtype=torch.bfloat16)), which needs "
                "no scaler, and call optimizer.step() directly; no update was made"
            )

    # Eager even inside torch.compile (torch.compile(optimizer.step) runs it uncompiled): the secret
    # seed must never become a constant of a compiled graph (inductor caches graphs on disk), a graph
    # specialised on the step counter would recompile every step, and the step's refusals (non-finite
    # norms, an implausible batch, a failed rank) are host decisions on the data. The wrapped
    # optimizer's own update compiles: optimizer.original_optimizer.step = torch.compile(...).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        self._refuse_loss_scaling()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_param_groups()
        failure: Optional[BaseException] = None
        prepared: Tuple[Dict[str, LayerRecord], Dict[int, torch.Tensor]] = ({}, {})
        try:
            prepared = self._prepare_private_grads()
        except BaseException as e:
            failure = e
        self._agree(failure)
        self._write_and_update(*prepared)
        return loss

    def _agree(self, failure: Optional[BaseException]) -> None:
        """Refuse the step on every rank if it failed on any (else a reduction would hang or miss a
        rank's examples); in one process, raise the failure."""
        params = [p for _, p in self._unique_params()]
        device = params[0].device if params else torch.device("cpu")
        if not self.ranks.all_succeeded(failure is None, device):
            self._discard()  # no half-written gradients, no half-consumed records survive a failed step
            if failure is not None:
                raise failure
            raise RuntimeError("the private step failed on another rank; no update was made on any rank")

    def _write_and_update(self, pending: Dict[str, LayerRecord], factors: Dict[int, torch.Tensor]) -> None:
        try:
            self._write_sums(pending, factors)
        except BaseException:
            self._discard()
            raise
        self._account()
        self.original_optimizer.step()
        self._finish_step()

    def mark_padding(self) -> None:
        """The rows of the next backward (until ``accumulate()`` or ``step()``) are public padding, not
        training data: their clip factors are 0, so they add exactly nothing (non-finite values are
        refused as in any step). For FSDP2, whose forward and backward are collectives every rank must
        run: a rank with no examples for a micro-batch runs the model on padding rows instead."""
        if self.collector.records:
            raise RuntimeError("mark_padding() must come before the forward and backward of the padding rows")
        self._padding = True

    @torch.compiler.disable  # eager even under torch.compile: see step()
    @torch.no_grad()
    def noise_only_step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> None:
        """The step of an empty Poisson batch: every parameter's gradient is its noise alone.

        ``closure``: for a rank of an FSDP2 model, whose forward and backward take part in collectives
        the other ranks wait for, so a rank with no examples must still run them. It runs the model on
        public padding rows (not training data) and returns the loss, e.g. ``lambda: loss_fn(model(pad_x),
        pad_y)``; the engine takes its backward with every row's clip factor set to 0, so the rows add
        exactly nothing (non-finite values are refused as in any step), and steps."""
        self._refuse_loss_scaling()
        if self.collector.records or self._accumulated or self._accumulated_examples:
            raise RuntimeError("noise_only_step() called after a backward pass or accumulate(): call step() instead")
        self._check_param_groups()
        if closure is not None:
            self.mark_padding()
            with torch.enable_grad():
                closure().backward()
            self.step()
            return
        failure: Optional[BaseException] = None
        try:
            self._raise_deferred()
            self.ranks.preflight([])
        except BaseException as e:
            failure = e
        self._agree(failure)  # other ranks' batches may not be empty
        self._write_and_update({}, {})
