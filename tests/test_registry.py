"""The registry of DP layers: MRO lookup, subclasses, user registrations (the README's example)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpkernels
from dpkernels.nn import DPLinear, registry


@pytest.fixture
def clean_registry():
    """Registrations made by a test are undone after it."""
    by_type, by_name = dict(registry._BY_TYPE), dict(registry._BY_NAME)
    yield
    registry._BY_TYPE.clear()
    registry._BY_TYPE.update(by_type)
    registry._BY_NAME.clear()
    registry._BY_NAME.update(by_name)


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _batch(B=6, d=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, d, generator=g), torch.randint(0, 3, (B,), generator=g)


class ScaledLinear(nn.Linear):
    """A user's layer: nn.Linear's product, times a fixed scale. It overrides forward."""

    def __init__(self, d_in, d_out, scale=0.5):
        super().__init__(d_in, d_out)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


def test_core_layers_are_registered():
    names = registry.registered()
    for cls in ("Linear", "Embedding", "LayerNorm", "RMSNorm", "GroupNorm", "Conv1d", "Conv2d", "MultiheadAttention"):
        assert any(k.endswith(f".{cls}") for k in names), cls


def test_a_subclass_that_overrides_forward_is_refused_by_class_name():
    """Strict (fallback=False): refused, naming the class; by default its few parameters run on the
    torch.func fallback, reported, and exact."""
    model = nn.Sequential(ScaledLinear(5, 3))
    with pytest.raises(
        ValueError,
        match=r"ScaledLinear '0'.*subclasses torch.nn.modules.linear.Linear but overrides "
        r"forward.*register_dp_layer",
    ):
        dpkernels.make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=6,
            fallback=False,
        )
    with pytest.warns(dpkernels.nn.fallback.DPFallbackWarning, match="ScaledLinear"):
        report = dpkernels.verify(nn.Sequential(ScaledLinear(5, 3)), _ce, _batch(), backend="torch")
    assert report.ok, str(report)


def test_a_frozen_unregistered_subclass_is_left_alone():
    model = nn.Sequential(ScaledLinear(5, 4).requires_grad_(False), nn.Linear(4, 3))
    converted = dpkernels.nn.convert(model)
    assert type(converted[0]) is ScaledLinear and type(converted[1]) is DPLinear


def test_readme_example_registers_a_user_layer(clean_registry):
    """README, 'Registering your own layer': a DP version of ScaledLinear, exact."""

    @dpkernels.nn.register_dp_layer(ScaledLinear)
    class DPScaledLinear(DPLinear):
        @classmethod
        def dp_from(cls, layer: ScaledLinear) -> "DPScaledLinear":
            return cls.adopt(layer, ("in_features", "out_features", "scale"), ("weight", "bias"))

        def forward(self, x):
            return super().forward(x) * self.scale

    model = nn.Sequential(ScaledLinear(5, 7), nn.Tanh(), ScaledLinear(7, 3, scale=2.0))
    report = dpkernels.verify(model, _ce, _batch(), backend="torch")
    assert report.ok, str(report)
    converted = dpkernels.nn.convert(copy.deepcopy(model))
    assert type(converted[0]) is DPScaledLinear and converted[2].scale == 2.0


def test_a_subclass_keeping_the_math_can_be_registered_with_the_parents_builder(clean_registry):
    class FastLayerNorm(nn.LayerNorm):  # like timm's: forward overridden, same math
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    dpkernels.nn.register(FastLayerNorm, dpkernels.nn.DPLayerNorm.dp_from)
    model = nn.Sequential(nn.Linear(5, 6), FastLayerNorm(6), nn.Linear(6, 3))
    assert dpkernels.verify(model, _ce, _batch(), backend="torch").ok


def test_registration_by_qualified_name_and_subclasses_of_it(clean_registry):
    class Affine(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(x)

    class Child(Affine):  # keeps forward: converted by the parent's entry
        pass

    seen = []
    dpkernels.nn.register(registry.qualified_name(Affine), lambda m: seen.append(type(m)) or m)
    dpkernels.nn.convert(nn.Sequential(Affine(), Child()))
    assert seen == [Affine, Child]


def test_a_builder_that_drops_a_parameter_is_refused(clean_registry):
    class TwoWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.ones(3))
            self.b = nn.Parameter(torch.ones(3))

    dpkernels.nn.register(TwoWeights, lambda m: nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"does not hold its parameter\(s\) a, b"):
        dpkernels.nn.convert(nn.Sequential(TwoWeights()))


def test_bad_registrations():
    with pytest.raises(TypeError, match="nn.Module subclass or its qualified name"):
        dpkernels.nn.register(int, lambda m: m)
    with pytest.raises(TypeError, match="callable"):
        dpkernels.nn.register(nn.Linear, None)
    with pytest.raises(TypeError, match="dp_from"):
        dpkernels.nn.register_dp_layer(nn.Linear)(type("NoBuilder", (), {}))
