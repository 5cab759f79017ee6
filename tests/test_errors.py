"""Every refusal says what is wrong: bad inputs to the kernels, backends that cannot run,
models and optimizers that cannot be trained privately, and misuse of a private step.

A model whose gradient could escape clipping must be refused, never trained silently.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpkernels
from dpkernels import functional


def _xg(B=3, T=4, d=5, p=6, dtype=torch.float32):
    return torch.randn(B, T, d, dtype=dtype), torch.randn(B, T, p, dtype=dtype)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 4))


def _private(model, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("max_grad_norm", 1.0)
    kw.setdefault("expected_batch_size", 4)
    return dpkernels.make_private(model, opt, **kw)


# ------------------------------------------------------------------ functional inputs -----

OPS = {
    "sq_norms": lambda x, g, **kw: functional.linear_sq_norms(x, g, **kw),
    "clipped_grad": lambda x, g, **kw: functional.linear_clipped_grad(
        x, g, torch.ones(x.shape[0], device=x.device), **kw
    ),
}


@pytest.mark.parametrize("op", OPS)
def test_shape_mismatch(op):
    x, _ = _xg()
    with pytest.raises(ValueError, match="must agree in every dimension but the last"):
        OPS[op](x, torch.randn(3, 5, 6))
    with pytest.raises(ValueError, match="must agree in every dimension but the last"):
        OPS[op](x, torch.randn(3, 4))  # different number of dimensions
    with pytest.raises(ValueError, match=r"shape \(B, d\)"):
        OPS[op](torch.randn(5), torch.randn(6))


@pytest.mark.parametrize("op", OPS)
def test_dtype_mismatch(op):
    x, g = _xg()
    with pytest.raises(TypeError, match="dtypes must match"):
        OPS[op](x, g.to(torch.bfloat16))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_unsupported_dtype(op, dtype):
    x, g = _xg()
    with pytest.raises(TypeError, match="must be float32, bfloat16 or float16"):
        OPS[op](x.to(dtype), g.to(dtype))


def test_wrong_clip_factors():
    x, g = _xg()
    with pytest.raises(ValueError, match=r"clip_factors must be a tensor of shape \(3,\)"):
        functional.linear_clipped_grad(x, g, torch.ones(4))
    with pytest.raises(ValueError, match=r"clip_factors must be a tensor of shape \(3,\)"):
        functional.linear_clipped_grad(x, g, torch.ones(3, 1))
    with pytest.raises(ValueError, match="clip_factors must be a tensor"):
        functional.clip_sum_noise(torch.randn(3, 5), [1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match="clip_factors must be floating point"):
        functional.clip_sum_noise(torch.randn(3, 5), torch.ones(3, dtype=torch.int64))


def test_bad_out_dtype():
    x, g = _xg()
    with pytest.raises(TypeError, match="out_dtype must be float32, bfloat16 or float16"):
        functional.linear_clipped_grad(x, g, torch.ones(3), out_dtype=torch.float64)


@pytest.mark.parametrize("bad", [-1.0, -1e-12, float("nan"), float("inf")])
def test_bad_noise_std(bad):
    x, g = _xg()
    with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
        functional.linear_clipped_grad(x, g, torch.ones(3), noise_std=bad)
    with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
        functional.clip_sum_noise(torch.randn(3, 5), torch.ones(3), noise_std=bad)
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        functional.gaussian_noise((4,), std=bad)


def test_clip_sum_noise_bad_inputs():
    with pytest.raises(TypeError, match="per_example must be float32, bfloat16 or float16"):
        functional.clip_sum_noise(torch.ones(3, 5, dtype=torch.int32), torch.ones(3))
    with pytest.raises(ValueError, match="per_example must be a tensor"):
        functional.clip_sum_noise(torch.tensor(1.0), torch.ones(1))
    with pytest.raises(ValueError, match="empty batch"):
        functional.clip_sum_noise(torch.ones(0, 5), torch.ones(0))


def test_unknown_method():
    x, g = _xg()
    with pytest.raises(ValueError, match="method must be one of"):
        functional.linear_sq_norms(x, g, method="fast")
    with pytest.raises(ValueError, match="method must be one of"):
        functional.linear_sq_norms(x, g, method="rowwise")  # internal, not a public choice


def test_empty_batch_functional():
    x, g = _xg(B=0)
    with pytest.raises(ValueError, match="empty batch"):
        functional.linear_sq_norms(x, g)
    with pytest.raises(ValueError, match="empty batch"):
        functional.linear_clipped_grad(x, g, torch.ones(0))


# ------------------------------------------------------------------ backends --------------


def test_unknown_backend_argument():
    x, g = _xg()
    with pytest.raises(ValueError, match="unknown dpkernels backend 'tpu'"):
        functional.linear_sq_norms(x, g, backend="tpu")
    with pytest.raises(ValueError, match="unknown dpkernels backend"):
        functional.clip_sum_noise(torch.randn(3, 5), torch.ones(3), backend="tpu")


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("DPKERNELS_BACKEND", "tpu")
    x, g = _xg()
    with pytest.raises(ValueError, match="unknown dpkernels backend 'tpu'"):
        functional.linear_sq_norms(x, g)
    with pytest.raises(ValueError, match="unknown dpkernels backend 'tpu'"):
        functional.linear_clipped_grad(x, g, torch.ones(3))
    # the argument wins over the environment
    functional.linear_sq_norms(x, g, backend="torch")


def test_backend_from_environment_is_used(monkeypatch):
    monkeypatch.setenv("DPKERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, g = _xg()
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        functional.linear_sq_norms(x, g)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    from dpkernels.ops._triton import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, g = _xg()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        functional.linear_sq_norms(x, g, backend="triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        functional.linear_clipped_grad(x, g, torch.ones(3), backend="triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        functional.clip_sum_noise(torch.randn(3, 5), torch.ones(3), backend="triton")
    assert functional.backends()["triton"]["available"] is torch.cuda.is_available()


def test_cuda_backend_on_cpu_tensors():
    x, g = _xg()
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        functional.linear_sq_norms(x, g, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        functional.clip_sum_noise(torch.randn(3, 5), torch.ones(3), backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        functional.gaussian_noise((3,), std=1.0, backend="cuda")


def test_make_private_backend_errors_surface_in_backward():
    model, opt = _private(_mlp(), backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        model(torch.randn(4, 7)).sum().backward()


def test_backends_report():
    report = functional.backends()
    assert set(report) == {"torch", "triton", "cuda", "cpu"}
    assert report["torch"] == {"available": True, "reason": None}
    for v in report.values():
        assert v["available"] or isinstance(v["reason"], str)


# ------------------------------------------------------------------ make_private: models --


def test_batchnorm_is_refused_by_name():
    model = nn.Sequential(nn.Linear(7, 9), nn.BatchNorm1d(9), nn.Linear(9, 4))
    with pytest.raises(ValueError, match=r"(?s)BatchNorm1d '1'.*BatchNorm mixes the examples"):
        _private(model)


def test_frozen_batchnorm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(7, 9), nn.BatchNorm1d(9), nn.Linear(9, 4))
    model[1].requires_grad_(False)
    with pytest.raises(ValueError, match="BatchNorm1d '1'.*batch statistics"):
        dpkernels.make_private(
            model,
            torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
        )


def test_unsupported_layer_is_refused_by_name():
    model = nn.Sequential(nn.Linear(7, 9), nn.PReLU(9), nn.Linear(9, 4))
    with pytest.raises(ValueError, match=r"PReLU '1' \(weight\): no per-example clipping path"):
        _private(model, fallback=False)  # (by default its 9 parameters run on the torch.func fallback)


def test_linear_subclass_that_overrides_forward_is_not_converted():
    """The registry walks the MRO: a subclass keeping nn.Linear's forward is converted, one that overrides
    it is refused by name (it may compute something else)."""

    class KeepsForward(nn.Linear):
        pass

    class OwnForward(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model, _ = _private(nn.Sequential(KeepsForward(7, 9), nn.Tanh(), nn.Linear(9, 4)))
    assert isinstance(model[0], dpkernels.nn.DPLinear)
    with pytest.raises(
        ValueError,
        match="OwnForward '0'.*subclasses torch.nn.modules.linear.Linear but overrides forward.*register_dp_layer",
    ):
        _private(nn.Sequential(OwnForward(7, 9), nn.Tanh(), nn.Linear(9, 4)), fallback=False)


def test_model_without_trainable_parameters():
    model = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        dpkernels.make_private(
            model,
            torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
        )


def test_other_unsupported_parameters_are_named():
    with pytest.raises(ValueError, match=r"Bilinear '0' \(weight, bias\): no per-example clipping path"):
        _private(nn.Sequential(nn.Bilinear(5, 5, 5), nn.Linear(5, 3)), fallback=False)

    class WithTemperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.temp = nn.Parameter(torch.ones(()))

    with pytest.raises(ValueError, match=r"WithTemperature '<root>' \(temp\)"):
        _private(WithTemperature(), fallback=False)


def test_tied_weights_in_layers_that_cannot_tie_are_refused():
    """Ties are supported between linear, embedding and norm layers (tests/test_tied.py); a
    convolution's weight shared with another convolution has no cross-term path yet."""
    a, b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
    b.weight = a.weight
    with pytest.raises(ValueError, match=r"shared by several DP layers, and 0, 2 \(DPConv2d, DPConv2d\) cannot"):
        _private(nn.Sequential(a, nn.Tanh(), b))


def test_optimizer_with_frozen_parameter():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"optimizer updates model parameter '0\.bias'.*without privacy"):
        dpkernels.make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)


def test_optimizer_with_outside_tensor():
    model = _mlp()
    extra = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD(list(model.parameters()) + [extra], lr=0.1)
    with pytest.raises(ValueError, match="a tensor that is not in the model"):
        dpkernels.make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)


def test_frozen_weight_with_trainable_bias():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="trainable bias with a frozen weight"):
        dpkernels.make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)


def test_make_private_twice():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, dp_opt = dpkernels.make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    with pytest.raises(RuntimeError, match="already attached to a private optimizer"):
        dpkernels.make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
        )
    with pytest.raises(RuntimeError, match="already"):
        dpkernels.make_private(_mlp(), dp_opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_grad_norm=0.0), "max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=-1.0), "max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=float("inf")), "max_grad_norm must be a finite number > 0"),
        (dict(noise_multiplier=-0.5), "noise_multiplier must be a finite number >= 0"),
        (dict(noise_multiplier=float("nan")), "noise_multiplier must be a finite number >= 0"),
        (dict(expected_batch_size=0), "expected_batch_size must be a positive int"),
        (dict(expected_batch_size=2.5), "expected_batch_size must be a positive int"),
        (dict(loss_reduction="foo"), "loss_reduction must be one of"),
        (dict(norm_method="fast"), "norm_method must be one of"),
        (dict(seed=-1), "seed must be an int in"),
        (dict(seed=2**64), "seed must be an int in"),
        (dict(accountant=object()), "accountant needs sample_rate"),
        (dict(accountant=object(), sample_rate=0.0), "accountant needs sample_rate"),
    ],
)
def test_bad_make_private_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _private(_mlp(), **kwargs)


def test_batch_first_must_be_a_bool():
    with pytest.raises(TypeError, match="batch_first must be True or False"):
        _private(_mlp(), batch_first=1)


def test_grad_scaler_is_refused_clearly():
    """float16 loss scaling would clip at C / scale and skip steps on overflow (data-dependent):
    GradScaler.step reaches DPOptimizer.step, which refuses it before touching anything."""
    model, opt = _private(_mlp())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(torch.randn(4, 7)).sum()).backward()
    with pytest.raises(RuntimeError, match="does not support torch.amp.GradScaler"):
        scaler.step(opt)
    assert all(p.grad is None for p in model.parameters()) and opt.steps_taken == 0
    assert not hasattr(opt, "grad_scale")  # nothing left behind: a plain step works afterwards
    model(torch.randn(4, 7)).sum().backward()
    opt.step()
    assert opt.steps_taken == 1


def test_batch_larger_than_expected_is_refused():
    """More examples than expected_batch_size can plausibly give (B̄ + 8√B̄ + 8) is refused at step."""
    model, opt = _private(_mlp())  # expected_batch_size=4 -> at most 28
    model(torch.randn(28, 7)).sum().backward()
    opt.step()
    opt.zero_grad()
    model(torch.randn(29, 7)).sum().backward()
    with pytest.raises(ValueError, match="saw 29 examples in one step but expected_batch_size is 4"):
        opt.step()


def test_refused_model_is_left_usable():
    """A refused make_private must not leave layers attached (a retry after fixing the model works)."""
    model = nn.Sequential(nn.Linear(7, 9), nn.PReLU(9), nn.Linear(9, 4))
    with pytest.raises(ValueError):
        _private(model, fallback=False)
    model[1].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dpkernels.make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)


# ------------------------------------------------------------------ misuse of a step ------


def test_step_without_backward():
    model, opt = _private(_mlp())
    with pytest.raises(RuntimeError, match="without a backward pass"):
        opt.step()
    model(torch.randn(4, 7)).sum().backward()
    opt.zero_grad()  # discards the backward
    with pytest.raises(RuntimeError, match="without a backward pass"):
        opt.step()


def test_second_backward_before_step():
    model, opt = _private(_mlp())
    loss = model(torch.randn(4, 7)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward before optimizer.step"):
        loss.backward()


def test_noise_only_step_after_backward():
    model, opt = _private(_mlp())
    model(torch.randn(4, 7)).sum().backward()
    with pytest.raises(RuntimeError, match="call step"):
        opt.noise_only_step()


class CallsTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 6)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def test_weight_sharing_in_one_forward():
    torch.manual_seed(0)
    model, opt = _private(CallsTwice())
    with pytest.raises(RuntimeError, match="used twice in one forward.*weight sharing"):
        model(torch.randn(4, 6)).sum().backward()


def test_weight_sharing_by_registering_one_layer_twice():
    torch.manual_seed(0)
    layer = nn.Linear(6, 6)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    with pytest.raises((ValueError, RuntimeError), match="shar"):
        m, opt = _private(model)
        m(torch.randn(4, 6)).sum().backward()


def test_gradient_bypassing_its_dp_layer():
    model, opt = _private(_mlp())
    x = torch.randn(4, 7)
    loss = model(x).sum() + F.linear(x, model[0].weight).square().sum()
    with pytest.raises(RuntimeError, match=r"parameter '0\.weight' received a gradient outside its DP layer"):
        loss.backward()


def test_param_group_added_after_make_private_is_refused():
    model, opt = _private(_mlp(), noise_multiplier=0.0)
    extra = nn.Parameter(torch.ones(3))
    with pytest.raises((ValueError, RuntimeError), match="clipping path"):
        opt.add_param_group({"params": [extra]})
        (model(torch.randn(4, 7)).sum() + (2 * extra).sum()).backward()
        opt.step()  # if not refused above, this must refuse rather than apply extra's raw gradient
    assert torch.equal(extra.detach(), torch.ones(3))


def test_layer_unfrozen_after_make_private_is_named():
    model = _mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = dpkernels.make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    model[0].requires_grad_(True)
    model(torch.randn(4, 7)).sum().backward()
    with pytest.raises((ValueError, RuntimeError), match=r"0\.weight"):
        opt.step()


@pytest.mark.parametrize("clipping", ["flat", "per_layer", "group", "automatic"])
def test_nan_input_names_the_layer(clipping):
    model = _mlp()
    model, opt = _private(model, clipping=clipping, groups=[["0"], ["2"]] if clipping == "group" else None)
    x = torch.randn(4, 7)
    x[2, 3] = float("nan")
    model(x).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        FloatingPointError, match=r"non-finite per-example gradient norm in DP layer '\d'.*examples \[2\]"
    ):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # no update was made
    # the failed step left nothing behind: no gradients, and no records a retry could reuse
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="without a backward pass"):
        opt.step()


def test_empty_batch_in_the_model():
    model, opt = _private(_mlp())
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 7))


def test_batch_sizes_must_agree_across_layers():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 5)
            self.b = nn.Linear(5, 5)

        def forward(self, x):
            return self.a(x).sum() + self.b(x[:2]).sum()

    torch.manual_seed(0)
    model, opt = _private(Odd())
    with pytest.raises(ValueError, match=r"got input of shape \(2, 5\).*B = 4"):
        model(torch.randn(4, 5)).backward()


def test_unbatched_input_under_private_training():
    model, opt = _private(_mlp())
    with pytest.raises(ValueError, match="needs batched input"):
        model(torch.randn(7))


def test_accountant_with_zero_noise_is_refused_up_front():
    class Acc:
        def step(self, **kw):
            raise AssertionError("never reached")

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no privacy"):
        dpkernels.make_private(
            model,
            opt,
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
            accountant=Acc(),
            sample_rate=0.1,
        )


def test_data_parallel_wrappers_are_refused():
    model = nn.DataParallel(_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="DataParallel"):
        dpkernels.make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
