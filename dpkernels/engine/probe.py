"""The probe that proves each DP layer's rows are examples (see ``dpkernels.engine.guard``).

Run once, from the model's forward pre-hook, on the first batch with two or more examples (and
again whenever a layer shows a layout not yet proven), before the training forward. In eval
mode (no dropout), with gradient tracking on (as in training: torch's fused inference paths,
which would bypass the DP layers, stay off) and the RNG state restored afterwards, it calls the
model three times on the batch the user passed:

    F1  the DP model: every DP layer on its private path (its own math, broadcast inputs expanded),
        each layer's example rows fingerprinted
    F0  the original model: every DP layer computes as its torch original
    F2  the DP model on the batch re-indexed by π, fingerprinted the same way

and, on F1's graph, two backward passes from the outputs of examples 0 and B − 1 to the DP
layers' outputs (no gradient is recorded or written),
with π(i) = (i + 1) mod B, except that the slot that would take example a takes example b
instead, where a, b are two different examples (a is dropped, b appears twice). It checks

    F1 = F0                 the model's outputs: the DP layers compute the original model
    F2[i] = F1[π(i)]        every DP layer's rows and the model's batch-shaped outputs follow the
                            examples: a row that depends on no example (a (T, T) position
                            matrix), on several (after a batch statistic) or on a position
                            (flattened rows) does not
    ∂out_k/∂row_j = 0       for j ≠ k: example k's outputs reach only its own row of each DP
                            layer; this is what shows an expanded (broadcast) input is used row by
                            row, whose B equal rows the forward checks cannot tell apart

Tensors are compared through fingerprints, so no activation is kept: along the last dimension
d, each row v becomes (⟨v, r_1⟩, ⟨v, r_2⟩, ⟨v, r_3⟩, ‖v‖) with fixed Gaussian r_k, compared to a
tolerance of the dtype's rounding; integer tensors (token ids) are compared exactly.

The batch tensors the probe re-indexes are the model's tensor arguments with B rows on their
batch dimension; if that fails (e.g. a (T, T) attention mask with B = T was re-indexed too), it
tries again re-indexing only the first tensor argument, and the layers pass if either passes.
If every example of the batch is the same, the structural checks still run but nothing can
show that examples are not mixed: the probe runs again on the next batch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .guard import ExampleGuard, ExampleLayout, batch_dim_of_input, tensor_leaves

_PROJECTIONS = 3


class _Fingerprints:
    """Fixed random projections per (row length, device), so that two runs project alike."""

    def __init__(self) -> None:
        self._vectors: Dict[Tuple[int, str], torch.Tensor] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """(…, K+1) float64 per row of the last dimension; an integer tensor as it is."""
        t = t.detach()
        if t.dim() == 0:
            t = t.reshape(1)
        if not (t.is_floating_point() or t.is_complex()):
            return t.clone()
        d = t.shape[-1]
        key = (d, str(t.device))
        r = self._vectors.get(key)
        if r is None:
            g = torch.Generator().manual_seed(d)
            r = torch.randn(d, _PROJECTIONS, generator=g, dtype=torch.float64).to(t.device)
            self._vectors[key] = r
        v = t.to(torch.float64)
        return torch.cat([v @ r, v.norm(dim=-1, keepdim=True)], dim=-1)


def _example_rows(fp: "_Fingerprints", ex: torch.Tensor) -> torch.Tensor:
    """Fingerprint of a tensor with its examples on dimension 0: (B, …, K+1), or the ids as (B, n)."""
    if not ex.is_floating_point():
        return fp(ex.reshape(ex.shape[0], -1))
    return fp(ex if ex.dim() > 1 else ex[:, None])


def _rtol(*tensors: torch.Tensor) -> float:
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
    for t in tensors:
        try:
            low = low or torch.is_autocast_enabled(t.device.type)
        except RuntimeError:
            pass
    return 5e-2 if low else 1e-3


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> Tuple[bool, float]:
    """Whether fingerprints a and b agree, and the worst relative difference."""
    if a.shape != b.shape:
        return False, float("inf")
    if not a.is_floating_point():
        same = bool(torch.equal(a, b))
        return same, 0.0 if same else float("inf")
    # NaN/Inf where both runs have them agree (the step's finite check refuses them, naming the layer)
    nonfinite_a, nonfinite_b = ~torch.isfinite(a), ~torch.isfinite(b)
    if not torch.equal(nonfinite_a, nonfinite_b):
        return False, float("inf")
    a, b = a.masked_fill(nonfinite_a, 0.0), b.masked_fill(nonfinite_b, 0.0)
    scale = torch.maximum(a[..., -1:], b[..., -1:])
    floor = 1e-6 * float(scale.max()) if scale.numel() else 0.0
    diff = (a - b).abs() / (scale + floor + 1e-300)
    worst = float(diff.max()) if diff.numel() else 0.0
    return worst <= 6 * rtol, worst


def _difference(worst: float) -> str:
    return "different ids or NaN/Inf patterns" if worst == float("inf") else f"worst relative difference {worst:.2g}"


class ProbeTrace:
    """What one probe call of the model saw: per DP layer call, fingerprints of its example rows."""

    def __init__(self, fingerprints: _Fingerprints) -> None:
        self.fp = fingerprints
        self.calls: List[Tuple[nn.Module, Tuple[str, ...], List[torch.Tensor]]] = []
        self.layouts: Dict[Tuple[nn.Module, int], ExampleLayout] = {}  # (layer, its n-th call): first input's

    def record(self, layer: nn.Module, inputs: Sequence[torch.Tensor], layouts: Sequence[ExampleLayout]) -> None:
        rows = [_example_rows(self.fp, layout.batch_first(t)) for t, layout in zip(inputs, layouts)]
        self.layouts[(layer, sum(1 for c in self.calls if c[0] is layer))] = layouts[0]
        self.calls.append((layer, tuple(layout.kind for layout in layouts), rows))


class _LayerIO:
    """Forward hooks on the DP layers: fingerprints of each call's raw inputs and outputs (F0 vs F1),
    and with ``keep_outputs`` the output tensors themselves (the gradient check)."""

    def __init__(self, layers: Sequence[nn.Module], fingerprints: _Fingerprints, keep_outputs: bool = False) -> None:
        self.fp = fingerprints
        self.calls: List[Tuple[nn.Module, List[torch.Tensor], List[torch.Tensor]]] = []
        self.outputs: List[Tuple[nn.Module, int, torch.Tensor]] = []
        self._keep = keep_outputs
        self._count: Dict[nn.Module, int] = {}
        self._handles = [m.register_forward_hook(self._hook) for m in layers]

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        outs = tensor_leaves(output)
        self.calls.append((module, [self.fp(t) for t in tensor_leaves(args)], [self.fp(t) for t in outs]))
        n = self._count.get(module, 0)
        self._count[module] = n + 1
        if self._keep and outs and outs[0].requires_grad:
            self.outputs.append((module, n, outs[0]))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


@contextlib.contextmanager
def _probe_conditions(model: nn.Module, guard: ExampleGuard) -> Iterator[None]:
    """Eval mode, gradient tracking on, the RNG state restored, the guard back in training mode after.
    Saved tensors are kept as they are even inside activation checkpointing (whose hooks would
    otherwise count the probe's tensors as the checkpointed forward's). Eager: a model compiled in
    place (``model.compile()``) runs its probe calls uncompiled."""
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    eager = (
        torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
    )
    try:
        for m, _ in modes:
            m.training = False
        with (
            torch.random.fork_rng(devices=devices),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(_keep, _keep),
            eager,
        ):
            yield
    finally:
        for m, was in modes:
            m.training = was
        guard.mode = "train"
        guard.trace = None


# A batch tensor of the model's call: (tensor, its batch dimension, rows per example on it).
BatchLeaf = Tuple[torch.Tensor, int, int]


def _batch_leaves(args: tuple, kwargs: dict, B: int, batch_first: bool, blocks: bool) -> List[BatchLeaf]:
    """The model's tensor arguments with B rows on their batch dimension (the layout rule's, else the
    other of dimensions 0 and 1: a (B, S) padding mask of a sequence-first model), and with ``blocks``
    also those with k·B rows on dimension 0, taken as batch-major blocks of k (a (B·H, L, S) mask)."""
    out = []
    for t in tensor_leaves((args, kwargs)):
        if t.dim() == 0:
            continue
        rule = batch_dim_of_input(t, batch_first)
        dims = [rule] + [d for d in (0, 1) if d != rule and d < t.dim()]
        bd = next((d for d in dims if t.shape[d] == B), None)
        if bd is not None:
            out.append((t, bd, 1))
        elif blocks and t.shape[0] % B == 0 and t.shape[0] > 0:
            out.append((t, 0, t.shape[0] // B))
    return out


def _reindex(args: tuple, kwargs: dict, leaves: Sequence[BatchLeaf], index: torch.Tensor) -> Tuple[tuple, dict]:
    chosen = {id(t): (bd, k) for t, bd, k in leaves}

    def pick(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and id(t) in chosen:
            bd, k = chosen[id(t)]
            if k == 1:
                return t.index_select(bd, index.to(t.device))
            return t.unflatten(0, (-1, k)).index_select(0, index.to(t.device)).flatten(0, 1)
        return t

    return pytree.tree_map(pick, (args, kwargs))


def _example_pair(leaves: Sequence[BatchLeaf]) -> Optional[int]:
    """An example that differs from example 0 in some batch tensor, or None if all are the same."""
    if not leaves:
        return None
    t0, bd0, k0 = leaves[0]
    B = t0.shape[bd0] // k0
    for j in range(1, B):
        for t, bd, k in leaves:
            rows = t.unflatten(bd, (B, k))
            if not torch.equal(rows.select(bd, 0), rows.select(bd, j)):
                return j
    return None


def _reindexing(B: int, b: Optional[int]) -> torch.Tensor:
    """π(i) = (i+1) mod B, with example 0 dropped for example b (see the module docstring)."""
    pi = [(i + 1) % B for i in range(B)]
    if b is not None:
        pi = [b if j == 0 else j for j in pi]
    return torch.tensor(pi, dtype=torch.long)


def _batch_outputs(output: Any, B: int, batch_first: bool, fp: _Fingerprints) -> List[torch.Tensor]:
    rows = []
    for t in tensor_leaves(output):
        if t.dim() >= 1 and t.shape[batch_dim_of_input(t, batch_first)] == B:
            rows.append(_example_rows(fp, t.movedim(batch_dim_of_input(t, batch_first), 0)))
    return rows


def _follows(
    trace1: ProbeTrace,
    trace2: ProbeTrace,
    out1: List[torch.Tensor],
    out2: List[torch.Tensor],
    pi: torch.Tensor,
    names: Dict[nn.Module, str],
) -> List[str]:
    """Failures of F2[i] = F1[π(i)], one line each (empty when every row follows the examples)."""
    problems: List[str] = []
    if [c[0] for c in trace1.calls] != [c[0] for c in trace2.calls]:
        return ["the DP layers ran in a different order or number when the examples were re-indexed"]
    for (layer, kinds, rows1), (_, _, rows2) in zip(trace1.calls, trace2.calls):
        for k, (r1, r2) in enumerate(zip(rows1, rows2)):
            ok, worst = _close(r2, r1.index_select(0, pi.to(r1.device)), _rtol(r1, r2))
            if not ok:
                which = f" (input {k})" if len(rows1) > 1 else ""
                problems.append(
                    f"DP layer '{names.get(layer, type(layer).__name__)}' ({type(layer).__name__}){which}: its rows "
                    f"along the batch dimension (layout '{kinds[k]}', {tuple(r1.shape[:-1])}) do not follow the "
                    f"examples ({_difference(worst)}): they are not one example each — a tensor "
                    "with no batch dimension (computed from positions, shared by all examples), a flattened batch, "
                    "rows that mix examples (a batch statistic before the layer), or per-example state the model "
                    "holds instead of taking it with the batch (a mask stored on the model: pass it as an argument)"
                )
    for k, (o1, o2) in enumerate(zip(out1, out2)):
        ok, worst = _close(o2, o1.index_select(0, pi.to(o1.device)), _rtol(o1, o2))
        if not ok:
            problems.append(
                f"output {k} of the model (batch-shaped) does not follow the examples ({_difference(worst)}): the "
                "model mixes the examples of a batch"
            )
    return problems


def _gradient_flow(
    io1: _LayerIO, trace1: ProbeTrace, out1: Any, B: int, batch_first: bool, names: Dict[nn.Module, str]
) -> List[str]:
    """Failures of "example k's outputs send gradient to row k of every DP layer, and to no other row",
    for k = 0 and k = B − 1 (one backward each, to the DP layers' outputs; nothing is recorded).

    This is what the forward checks cannot see for a broadcast input: its B expanded rows are equal,
    so a model that went on to use one row for every example (``pos[0]``) would look the same forward,
    while row 0 would carry every example's gradient."""
    leaves = [
        t
        for t in tensor_leaves(out1)
        if t.dim() >= 1
        and t.is_floating_point()
        and t.requires_grad
        and t.shape[batch_dim_of_input(t, batch_first)] == B
    ]
    outs = [(m, n, t) for m, n, t in io1.outputs if (m, n) in trace1.layouts]
    if not outs:
        return []
    if not leaves:
        shared = [names.get(m, type(m).__name__) for (m, _), lay in trace1.layouts.items() if lay.kind == "broadcast"]
        if shared:
            return [
                f"DP layers {', '.join(sorted(set(shared)))} take an input shared by every example (expanded "
                "to the batch), and the model returns no per-example output through which the probe could "
                "check that each example's gradient reaches only its own row: return per-example outputs "
                "(e.g. logits) as well, or freeze those layers"
            ]
        return []
    problems: List[str] = []
    g = torch.Generator().manual_seed(B)
    weights = [
        torch.randn(t.movedim(batch_dim_of_input(t, batch_first), 0)[0].shape, generator=g, dtype=torch.float64).to(
            t.device
        )
        for t in leaves
    ]
    for k in sorted({0, B - 1}):
        scalar = sum(
            (t.movedim(batch_dim_of_input(t, batch_first), 0)[k].double() * w).sum() for t, w in zip(leaves, weights)
        )
        grads = torch.autograd.grad(scalar, [t for _, _, t in outs], retain_graph=True, allow_unused=True)
        for (m, n, _), grad in zip(outs, grads):
            if grad is None:
                continue
            rows = trace1.layouts[(m, n)].batch_first(grad).reshape(B, -1).double().norm(dim=1)
            others = rows.clone()
            others[k] = 0.0
            if float(others.max()) > 1e-6 * float(rows.max()) + 1e-30:
                where = int(others.argmax())
                problems.append(
                    f"DP layer '{names.get(m, type(m).__name__)}' ({type(m).__name__}): example {k}'s outputs send "
                    f"gradient to its row {where}, which belongs to example {where} (the model uses a row of this "
                    "layer for other examples than its own, e.g. indexes one row of a broadcast tensor)"
                )
    return problems


def _same_model(
    io0: _LayerIO, io1: _LayerIO, out0: Any, out1: Any, fp: _Fingerprints, names: Dict[nn.Module, str]
) -> List[str]:
    """Failures of F1 = F0: the DP model's outputs against the original's, and the first DP layer to blame."""
    problems = []
    for k, (a, b) in enumerate(zip(tensor_leaves(out0), tensor_leaves(out1))):
        fa, fb = fp(a), fp(b)
        if fa.shape != fb.shape:
            try:
                fa = torch.broadcast_to(fa, fb.shape)
            except RuntimeError:
                problems.append(f"output {k} has shape {tuple(b.shape)} with the DP layers, {tuple(a.shape)} without")
                continue
        ok, worst = _close(fa, fb, _rtol(a, b))
        if not ok:
            problems.append(f"output {k} of the model differs with the DP layers ({_difference(worst)})")
    if len(tensor_leaves(out0)) != len(tensor_leaves(out1)):
        problems.append("the model returns a different number of tensors with the DP layers")
    if problems:
        problems += _blame(io0, io1, names)
    return problems


def _blame(io0: _LayerIO, io1: _LayerIO, names: Dict[nn.Module, str]) -> List[str]:
    """The first DP layer whose inputs agree without and with the DP layers but whose outputs do not."""
    for (m0, in0, o0), (m1, in1, o1) in zip(io0.calls, io1.calls):
        if m0 is not m1:
            return ["the DP layers ran in a different order than their originals"]

        def agree(xs: List[torch.Tensor], ys: List[torch.Tensor]) -> bool:
            if len(xs) != len(ys):
                return False
            for x, y in zip(xs, ys):
                try:
                    x = torch.broadcast_to(x, y.shape)
                except RuntimeError:
                    return False
                if not _close(x, y, 1e-3 if x.is_floating_point() else 0.0)[0]:
                    return False
            return True

        if agree(in0, in1) and not agree(o0, o1):
            return [
                f"DP layer '{names.get(m1, type(m1).__name__)}' ({type(m1).__name__}) computes something other "
                "than the layer it replaced (same input, different output): its DP version does not fit this "
                "layer class"
            ]
    return [
        "no single DP layer differs from its original: the change comes from the model's own code around a "
        "DP layer whose input was expanded from 1 to B rows (a broadcast the model does not treat as one)"
    ]


def run_probe(guard: ExampleGuard, args: tuple, kwargs: dict) -> None:
    """Prove the example layout of every DP layer the model runs on this batch, or raise (see above)."""
    model = guard.model
    B = guard.batch_size
    assert model is not None and B is not None and B >= 2
    fp = _Fingerprints()
    exact = _batch_leaves(args, kwargs, B, guard.batch_first, blocks=False)
    with_blocks = _batch_leaves(args, kwargs, B, guard.batch_first, blocks=True)
    b = _example_pair(exact)
    pi = _reindexing(B, b)
    layers = list(guard.names)
    names = guard.names
    with _probe_conditions(model, guard):
        # the DP model first, so that a DP layer's own refusal (unbatched input, ...) is the error seen
        guard.mode = "probe"
        guard.trace = trace1 = ProbeTrace(fp)
        io1 = _LayerIO(layers, fp, keep_outputs=True)
        try:
            out1 = model(*args, **kwargs)
        finally:
            io1.remove()
        flow = _gradient_flow(io1, trace1, out1, B, guard.batch_first, names)
        io1.outputs = []
        out1 = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out1)

        guard.mode = "plain"
        guard.trace = None
        io0 = _LayerIO(layers, fp)
        try:
            out0 = model(*args, **kwargs)
        finally:
            io0.remove()
        out0 = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out0)
        problems = _same_model(io0, io1, out0, out1, fp, names)
        rows1 = _batch_outputs(out1, B, guard.batch_first, fp)
        del out0, out1, io0, io1
        guard.mode = "probe"

        # which tensors to re-index: every batch tensor, then also batch-major blocks, then the first alone
        candidates = [exact]
        if len(with_blocks) > len(exact):
            candidates.append(with_blocks)
        first = [t for t in tensor_leaves((args, kwargs)) if t.dim() >= 1][:1]
        primary = [leaf for leaf in exact if first and leaf[0] is first[0]]
        if primary and len(exact) > 1:
            candidates.append(primary)
        follows: List[str] = []
        for chosen in candidates:
            p_args, p_kwargs = _reindex(args, kwargs, chosen, pi)
            guard.trace = trace2 = ProbeTrace(fp)
            out2 = model(*p_args, **p_kwargs)
            rows2 = _batch_outputs(out2, B, guard.batch_first, fp)
            del out2
            follows = _follows(trace1, trace2, rows1, rows2, pi, names)
            if not follows:
                break
    problems += follows + flow
    if problems:
        raise ValueError(
            "make_private's probe could not show that every row a DP layer clips is one example of the batch "
            f"(B = {B}; the probe re-indexes the examples and checks that each DP layer's rows follow):\n  - "
            + "\n  - ".join(problems)
            + "\nClipping such rows would not clip examples, which is not private; no step was taken. Freeze the "
            "layers named (requires_grad_(False)), fix the input layout (batch_first), or register a DP layer that "
            "handles this module (dpkernels.nn.register_dp_layer; see the README)"
        )
    for layer, kinds, _ in trace1.calls:
        guard.proven[layer] = kinds
    guard.probe_complete = guard.probe_complete or b is not None
