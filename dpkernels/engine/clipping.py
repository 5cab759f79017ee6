"""Clipping styles: which norm each example's gradient is clipped by, and to what.

The DP layers are split into groups k, each with its own threshold C_k; example i's gradient
restricted to group k, g_i^(k), is scaled by a factor computed from its norm over that group:

    flat        one group (every layer)                c_i = min(1, C / (‖g_i‖ + 1e-6))
    automatic   one group, normalised (AUTO-S)         c_i = C / (‖g_i‖ + γ)
    per_layer   one group per DP layer                 c_i^(l) = min(1, C_l / (‖g_i^(l)‖ + 1e-6))
    group       the groups the user names              c_i^(k) = min(1, C_k / (‖g_i^(k)‖ + 1e-6))

Every style bounds an example's whole clipped gradient by C = sqrt(Σ_k C_k²): the clipped sum
has L2 sensitivity C under add/remove-one adjacency, and the noise is σ·C whatever the style.
A single ``max_grad_norm`` C is split evenly, C_k = C / √K over K groups; a sequence gives the
C_k themselves. Per-layer clipping needs nothing but the layer's own norm, so the engine clips
each layer inside its backward and keeps no (x, G) until the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

CLIP_EPS = 1e-6
STYLES = ("flat", "automatic", "per_layer", "group")


def flat_clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Flat clipping: c_i = min(1, C / (‖g_i‖ + 1e-6)) from ‖g_i‖² (float32 (B,)).

    ‖c_i g_i‖ ≤ C for every example, so the clipped sum has L2 sensitivity C under
    add/remove-one adjacency.
    """
    norms = sq_norms.float().clamp_min(0.0).sqrt()
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def automatic_clip_factors(sq_norms: torch.Tensor, max_grad_norm: float, gamma: float) -> torch.Tensor:
    """Automatic clipping (AUTO-S, Bu et al. 2023): c_i = C / (‖g_i‖ + γ); ‖c_i g_i‖ < C."""
    norms = sq_norms.float().clamp_min(0.0).sqrt()
    return max_grad_norm / (norms + gamma)


@dataclass(frozen=True)
class ClippingPlan:
    """Which group each DP layer's norm counts in, and each group's threshold C_k."""

    style: str
    group_of: Dict[str, int]
    group_norms: Tuple[float, ...]
    gamma: float = 0.01

    @property
    def total_norm(self) -> float:
        """C = sqrt(Σ_k C_k²): the L2 sensitivity of the clipped sum, which the noise is scaled to."""
        return math.sqrt(sum(c * c for c in self.group_norms))

    @property
    def clips_in_backward(self) -> bool:
        """Per-layer clipping needs only the layer's own norm: clip during backward, keep nothing."""
        return self.style == "per_layer"

    def factors(self, group: int, sq_norms: torch.Tensor) -> torch.Tensor:
        """Clip factors (B,) of ``group`` from its per-example squared norms."""
        if self.style == "automatic":
            return automatic_clip_factors(sq_norms, self.group_norms[group], self.gamma)
        return flat_clip_factors(sq_norms, self.group_norms[group])


def _merge_ties(member_lists: List[List[str]], ties: Sequence[Sequence[str]]) -> List[List[str]]:
    """The groups with every tie's layers merged into the group of its first layer (order kept)."""
    group = {n: k for k, members in enumerate(member_lists) for n in members}
    for tie in ties:
        target = group[tie[0]]
        for n in tie[1:]:
            old = group[n]
            if old != target:
                for m, k in group.items():
                    if k == old:
                        group[m] = target
    merged: Dict[int, List[str]] = {}
    for members in member_lists:
        for n in members:
            merged.setdefault(group[n], []).append(n)
    return [merged[k] for k in sorted(merged)]


def make_plan(
    style: str,
    layer_names: List[str],
    max_grad_norm: Union[float, Sequence[float]],
    groups: Optional[Sequence[Sequence[str]]] = None,
    gamma: float = 0.01,
    ties: Sequence[Sequence[str]] = (),
) -> ClippingPlan:
    """The ClippingPlan of ``style`` for DP layers ``layer_names`` (those with trainable parameters).

    ``ties``: lists of layers that share a parameter. Its per-example norm involves all of them,
    so they are one group: per-layer clipping merges them, and named groups must keep them together.

    Raises ValueError naming the problem: an unknown style, groups with unknown, missing or
    repeated layers, a threshold list of the wrong length, thresholds that are not positive.
    """
    if style not in STYLES:
        raise ValueError(f"clipping must be one of {STYLES}, got {style!r}")
    if groups is not None and style != "group":
        raise ValueError(f"groups= is for clipping='group', not {style!r}")
    if style == "automatic" and not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"auto_clip_gamma must be a finite number > 0, got {gamma!r}")
    if style in ("flat", "automatic"):
        member_lists = [list(layer_names)]
    elif style == "per_layer":
        member_lists = _merge_ties([[n] for n in layer_names], ties)
    else:
        if not groups:
            raise ValueError("clipping='group' needs groups=[[layer names], ...] covering every DP layer")
        member_lists = [list(g) for g in groups]
        known = set(layer_names)
        seen: Dict[str, int] = {}
        for k, members in enumerate(member_lists):
            if not members:
                raise ValueError(f"clipping group {k} is empty")
            for name in members:
                if name not in known:
                    raise ValueError(
                        f"clipping group {k} names '{name}', which is not a DP layer with trainable parameters "
                        f"(those are: {', '.join(layer_names)})"
                    )
                if name in seen:
                    raise ValueError(f"DP layer '{name}' is in clipping groups {seen[name]} and {k}; one group each")
                seen[name] = k
        missing = [n for n in layer_names if n not in seen]
        if missing:
            raise ValueError(f"DP layers in no clipping group (they would go unclipped): {', '.join(missing)}")
        for tie in ties:
            if len({seen[n] for n in tie}) > 1:
                raise ValueError(
                    f"DP layers {', '.join(tie)} share a parameter, so its per-example norm involves all of them: "
                    "put them in one clipping group"
                )
    K = len(member_lists)
    if isinstance(max_grad_norm, (int, float)):
        norms = [float(max_grad_norm) / math.sqrt(K)] * K
    else:
        norms = [float(c) for c in max_grad_norm]
        if style in ("flat", "automatic"):
            raise ValueError(f"clipping={style!r} takes one max_grad_norm, got a sequence")
        if len(norms) != K:
            raise ValueError(f"max_grad_norm lists {len(norms)} thresholds for {K} clipping groups")
    for c in norms:
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"every clipping threshold must be a finite number > 0, got {c!r}")
    group_of = {name: k for k, members in enumerate(member_lists) for name in members}
    return ClippingPlan(style, group_of, tuple(norms), float(gamma))
