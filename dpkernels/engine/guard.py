"""The example guard: no row is clipped as an example unless it is shown to belong to one.

Per-example clipping is private only if every row a DP layer clips holds the gradient of one
example of the model's batch. A batch-size bound cannot tell that: a layer that sees the batch
flattened to (B·T, d), a (T, T) matrix with no batch dimension when B = T, or position ids of
shape (1, T) broadcast over the batch all pass one. The guard establishes it from the model
itself:

1. **The batch comes from the model's input.** A forward pre-hook on the model given to
   ``make_private`` reads B from its first tensor argument (dimension 0, or 1 for
   ``batch_first=False`` inputs with two or more dimensions). A DP layer that runs outside a
   call of that model is refused.
2. **Every DP layer shows B on its batch dimension** (``admit``, at every forward), in one of
   three layouts, and anything else is refused naming the layer, its shape, B and the likely
   cause:

       batch       N = B rows on the batch dimension: row i is example i
       broadcast   N = 1 while B > 1: the input is shared by every example (position ids of
                   shape (1, T)); it is expanded to B rows *before* the layer, so that the
                   broadcast that would have summed the examples' gradients never happens
       flattened   N = B·R rows, batch-major (example i owns rows iR … iR+R−1); only for a
                   layer whose layout an integration or the user declared
                   (``dpkernels.nn.declare_flattened``)

3. **A probe proves the layout** (``dpkernels.engine.probe``) the first time a layer runs with
   B ≥ 2 (and again whenever a layer's layout changes): without gradient tracking
   consequences, in eval mode, the model runs on the batch as the user wrote it, with the DP
   layers, and with the examples re-indexed by a map π that drops one example and duplicates
   another. Each DP layer's example rows must follow π (row i of the re-indexed run equals row
   π(i) of the first), the model's batch-shaped outputs too, and the DP model's outputs must
   equal the original model's. A (T, T) matrix with B = T does not follow π; a layer after
   anything that mixes examples (a batch statistic) does not either, because π changes the
   batch's composition.

What the guard cannot see is the model's *input* layout: B is what the model receives on the
dimension ``batch_first`` names. Passing sequence-first input with ``batch_first=True`` makes
positions the "examples"; the probe refuses that for any model that mixes positions (attention,
convolution, recurrence), but a model that treats every position independently would be
accepted, so ``batch_first`` must describe the input.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

LAYOUTS = ("batch", "broadcast", "flattened")

_UNKNOWN = object()  # the exception at a model call's entry, where a traced pre-hook could not read it


@dataclass(frozen=True)
class ExampleLayout:
    """Where the examples of a DP layer's input are: ``batch_dim`` holds B rows ("batch"), one
    row expanded to B ("broadcast"), or B·R batch-major rows ("flattened", R = ``rows_per_example``)."""

    kind: str
    batch_dim: int
    examples: int
    rows_per_example: int = 1

    def batch_first(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the layer's input, its output or either's gradient) with the examples on dimension 0:
        (B, ...), and (B, R, ...) for flattened rows."""
        if self.batch_dim != 0:
            t = t.movedim(self.batch_dim, 0)
        if self.kind == "flattened":
            t = t.unflatten(0, (self.examples, self.rows_per_example))
        return t


def batch_dim_of_input(t: torch.Tensor, batch_first: bool) -> int:
    """The dimension of a model input that holds its examples (the rule ``make_private`` documents)."""
    return 0 if batch_first or t.dim() < 2 else 1


def tensor_leaves(tree: Any) -> List[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


class ExampleGuard:
    """Per model: the batch of the current forward, the layers' proven layouts, the probe's state."""

    def __init__(self, batch_first: bool) -> None:
        self.batch_first = batch_first
        self.model: Optional[nn.Module] = None
        self.names: Dict[nn.Module, str] = {}
        self.batch_size: Optional[int] = None  # B of the model call in progress or last made
        self.mode = "train"  # "plain" (DP layers act as their torch originals) or "probe" during a probe
        self.proven: Dict[nn.Module, Tuple[str, ...]] = {}  # layer -> layouts the probe established
        self.probe_complete = False  # a probe ran on a batch with two different examples
        self.unproven: Set[nn.Module] = set()  # layers seen this forward in a layout not yet proven
        self.trace: Optional[Any] = None  # the probe's recorder while a probe runs
        self._inputs: Optional[Tuple[tuple, dict]] = None
        self._in_forward = 0  # depth of model calls in progress (the model may call itself)
        self._exception_at_entry: Optional[BaseException] = None
        self._meta = False
        self._handles: List[Any] = []

    # ---- the model's batch ---------------------------------------------------------------
    def attach(self, model: nn.Module, names: Dict[nn.Module, str]) -> None:
        self.model = model
        self.names = {m: (n or "<root>") for m, n in names.items()}
        self._handles = [
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            model.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True),
        ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def model_batch(self, args: tuple, kwargs: dict) -> Optional[int]:
        """B of a model call: the batch dimension's size of its first tensor argument with one (None
        without such an argument: a DP layer that then runs is refused)."""
        leaves = [t for t in tensor_leaves((args, kwargs)) if t.dim() >= 1]
        if not leaves:
            return None
        first = leaves[0]
        # (a symbolic size while torch.compile traces with a dynamic batch: not int(), which would
        # specialise the graph to one batch size)
        return first.shape[batch_dim_of_input(first, self.batch_first)]

    # The two hooks run as Python around an eager forward. While torch.compile traces the model they
    # are traced into its graph (so that B stays symbolic and a batch of another size reuses the
    # graph), except when the probe must run: then they call their eager versions, which the
    # compiler leaves out of the graph (a graph break before or after the model's forward, never
    # inside it). What the traced versions decide depends on the guard's state (probe_complete,
    # proven layouts, batch size), on which torch.compile guards, so a change of that state
    # recompiles and decides again.
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.mode != "train":
            return None  # a probe's own call of the model
        if torch.compiler.is_compiling() and not self._probe_due(args, kwargs):
            self._enter(args, kwargs, exception_at_entry=_UNKNOWN)
            return None
        return self._pre_hook_eager(args, kwargs)

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.mode != "train":
            return None
        if torch.compiler.is_compiling() and not (self._in_forward == 1 and self.unproven):
            self._in_forward -= 1
            if self._in_forward == 0:
                self._inputs = None
            return None
        return self._post_hook_eager()

    def _probe_due(self, args: tuple, kwargs: dict) -> bool:
        """Whether this model call must run the probe first (the eager pre-hook's condition)."""
        if self._in_forward > 0 or self.probe_complete or not torch.is_grad_enabled():
            return False
        if any(t.device.type == "meta" for t in tensor_leaves((args, kwargs))):
            return False
        B = self.model_batch(args, kwargs)
        return B is not None and B >= 2

    def _enter(self, args: tuple, kwargs: dict, exception_at_entry: Any) -> bool:
        """The bookkeeping of a model call's start; True for the outermost call."""
        self._in_forward += 1
        if self._in_forward > 1:
            return False  # the model calling itself
        self._exception_at_entry = exception_at_entry
        self.batch_size = self.model_batch(args, kwargs)
        self.unproven = set()
        self._inputs = (args, kwargs)
        # meta tensors (the memory model) hold no data: there is nothing to probe, nor to leak
        self._meta = any(t.device.type == "meta" for t in tensor_leaves((args, kwargs)))
        return True

    @torch.compiler.disable
    def _pre_hook_eager(self, args: tuple, kwargs: dict) -> None:
        if not self._enter(args, kwargs, exception_at_entry=sys.exc_info()[1]):
            return None
        if (
            torch.is_grad_enabled()
            and not self.probe_complete
            and not self._meta
            and self.batch_size is not None
            and self.batch_size >= 2
        ):
            from .probe import run_probe

            run_probe(self, args, kwargs)
        return None

    @torch.compiler.disable
    def _post_hook_eager(self) -> None:
        self._in_forward -= 1
        if self._in_forward > 0:
            return None
        inputs, self._inputs = self._inputs, None
        entry = self._exception_at_entry
        if entry is not _UNKNOWN and sys.exc_info()[1] is not entry:
            # the forward raised (this hook is always called): its error propagates. (After a traced
            # pre-hook the exception at entry is unknown: the check below then runs, never skipped.)
            return None
        if self.unproven:
            from .probe import run_probe

            layers, self.unproven = self.unproven, set()
            run_probe(self, *inputs)
            still = [self.names.get(m, type(m).__name__) for m in layers if m not in self.proven]
            if still:
                raise ValueError(
                    f"DP layers {', '.join(still)} ran in this training forward but not when the model ran in eval "
                    "mode, so the probe could not check which example each of their rows belongs to; refusing them. "
                    "Make them run in eval mode too, or freeze them"
                )
        return None

    # ---- each DP layer's rows ------------------------------------------------------------
    def admit(
        self, layer: nn.Module, inputs: Sequence[torch.Tensor], batch_dim: int, declared: str = "batch"
    ) -> Tuple[List[torch.Tensor], List[ExampleLayout]]:
        """Check where the examples of ``layer``'s ``inputs`` are (see the module docstring); return the
        inputs (a broadcast one expanded to B rows) and their layouts. Raises, naming the layer."""
        name = self.names.get(layer, type(layer).__name__)
        B = self.batch_size
        if self._in_forward > 0 and B is None:
            raise ValueError(
                f"DP layer '{name}' ran in a call of the model with no batched tensor argument, so the batch size "
                "is unknown; pass the batch as tensors (e.g. model(input_ids=..., attention_mask=...))"
            )
        if B is None or (self._in_forward == 0 and self.mode == "train"):
            raise RuntimeError(
                f"DP layer '{name}' ran outside a call of the model given to make_private, so which example "
                "each of its rows belongs to is unknown. Call the model itself (model(...), not model.forward(...) "
                "or one of its submodules), or give that submodule to make_private"
            )
        out: List[torch.Tensor] = []
        layouts: List[ExampleLayout] = []
        for t in inputs:
            if t.dim() <= batch_dim:
                raise ValueError(
                    f"DP layer '{name}' ({type(layer).__name__}) got input of shape {tuple(t.shape)} with no batch "
                    f"dimension {batch_dim}; under private training it needs batched input"
                )
            N = t.shape[batch_dim]
            if N == 0:
                raise ValueError(
                    f"empty batch reached {type(layer).__name__} '{name}': with Poisson sampling call "
                    "optimizer.noise_only_step() for an empty batch instead of running the model"
                )
            if declared == "flattened" and batch_dim == 0 and N % B == 0:
                layout = ExampleLayout("flattened", 0, B, N // B)
            elif N == B:
                layout = ExampleLayout("batch", batch_dim, B)
            elif N == 1:
                layout = ExampleLayout("broadcast", batch_dim, B)
                t = t.expand(*t.shape[:batch_dim], B, *t.shape[batch_dim + 1 :])
            else:
                raise ValueError(self._refusal(name, layer, t, batch_dim, B, declared))
            out.append(t)
            layouts.append(layout)
        kinds = tuple(layout.kind for layout in layouts)
        if self.mode == "probe":
            self.trace.record(layer, out, layouts)
        elif B >= 2 and not self._meta and self.proven.get(layer) != kinds:
            self.unproven.add(layer)
        return out, layouts

    def _refusal(self, name: str, layer: nn.Module, t: torch.Tensor, batch_dim: int, B: int, declared: str) -> str:
        N = t.shape[batch_dim]
        what = f"DP layer '{name}' ({type(layer).__name__}) got input of shape {tuple(t.shape)}"
        where = f"dimension {batch_dim}, where it takes the examples (batch_first={self.batch_first})"
        if N % B == 0 and batch_dim == 0:
            cause = (
                f"{N} = {B} × {N // B} rows on {where}: the batch looks flattened (e.g. (B·T, d) from a reshape "
                "before the layer), and a row is then a position, not an example. If the rows are batch-major "
                "(example i owns rows i·R … i·R+R−1), declare it: dpkernels.nn.declare_flattened(layer); "
                "otherwise reshape to (B, T, d) before the layer"
            )
        else:
            cause = (
                f"{N} rows on {where}, but the model's batch has B = {B} examples: the tensor likely has no batch "
                "dimension (computed from positions or shared by every example, e.g. ids of shape (T,) or (T, T)), "
                "or the examples are on another dimension (a sequence-first model needs make_private(..., "
                "batch_first=False)). Freeze the layer, or give it input with the batch on that dimension"
            )
        return f"{what}: {cause}. Clipping these rows would not clip examples; refusing"

    def clear_step(self) -> None:
        self.unproven = set()
