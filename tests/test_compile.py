"""torch.compile of a model made private: the compiled step is the eager step.

The model is compiled with ``fullgraph=True`` (forward and backward of every DP layer, the guard's
per-call checks and the recording into the engine in one graph: any graph break fails) after one
eager step, which runs the guard's probe (eager Python, outside any graph). The optimizer's step is
eager by design (``DPOptimizer.step``: the secret seed never enters a graph). Compared with the same
model run eagerly, noise-free the gradients and weights agree to float32 rounding; with noise, the
draws are the same for the same seed and step, and fresh at every step.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpkernels
from dpkernels.ops.philox import PhiloxKey, philox_normal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import models  # noqa: E402

SEED = 1234


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    return model, _classes(12, 5)


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, stride=2),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )
    return model, lambda B, seed: (
        torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(seed)),
        torch.randint(0, 5, (B,), generator=torch.Generator().manual_seed(seed + 1)),
    )


GPT = models.GPTConfig(vocab=500, seq=12, d_model=32, n_layer=2, n_head=4, d_mlp=64, batch=6, train_all=True, tied=True)


def _gpt():
    """Token and position embeddings (the head tied to the token table, whose clipped sum is a row scatter;
    the small position table's per-example gradients are materialised), LayerNorms, attention."""
    model = models.build("gpt", GPT, seed=0, device=torch.device("cpu"), dtype=torch.float32)

    def batch(B, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, GPT.vocab, (B, GPT.seq), generator=g), torch.randint(
            0, GPT.vocab, (B, GPT.seq), generator=g
        )

    return model, batch


class _Encoder(nn.Module):
    """nn.TransformerEncoderLayer (nn.MultiheadAttention's packed projection, LayerNorm) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(dim=1))


def _encoder():
    torch.manual_seed(0)
    return _Encoder(), lambda B, seed: (
        torch.randn(B, 7, 16, generator=torch.Generator().manual_seed(seed)),
        torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(seed + 1)),
    )


def _classes(d, k):
    return lambda B, seed: (
        torch.randn(B, d, generator=torch.Generator().manual_seed(seed)),
        torch.randint(0, k, (B,), generator=torch.Generator().manual_seed(seed + 1)),
    )


MODELS = {"mlp": _mlp, "cnn": _cnn, "gpt": _gpt, "encoder": _encoder}


def _loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _pair(kind, *, lr=0.05, **kw):
    """The same model twice, each made private with the same seed: (eager, optimizer), (to compile, optimizer)."""
    model, batch = MODELS[kind]()
    twin = copy.deepcopy(model)
    kw = {"noise_multiplier": 0.0, "max_grad_norm": 0.05, "expected_batch_size": 6, "seed": SEED, **kw}
    pairs = []
    for m in (model, twin):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr, momentum=0.9)
        pairs.append(dpkernels.make_private(m, opt, **kw))
    return pairs, batch


def _step(model, opt, x, y):
    opt.zero_grad()
    _loss(model(x), y).backward()
    opt.step()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(a, b, rtol=2e-5):
    assert a.keys() == b.keys()
    for n in a:
        scale = float(a[n].abs().max())
        torch.testing.assert_close(b[n], a[n], rtol=rtol, atol=rtol * scale, msg=n)


@pytest.mark.parametrize("kind", list(MODELS))
def test_compiled_step_equals_eager_step(kind):
    """MLP, CNN with GroupNorm, a tied GPT (embeddings, LayerNorm, attention) and a TransformerEncoderLayer
    (DPMultiheadAttention): one graph each (fullgraph), the steps equal to float32 rounding."""
    ((me, oe), (mc, oc)), batch = _pair(kind)
    x, y = batch(6, 0)
    for model, opt in ((me, oe), (mc, oc)):
        _step(model, opt, x, y)  # eager: the guard's probe
    compiled = torch.compile(mc, fullgraph=True)
    for s in range(1, 4):
        x, y = batch(6, s)
        _step(me, oe, x, y)
        _step(compiled, oc, x, y)
        _assert_close(_grads(me), _grads(mc))
    for (n, p), (_, q) in zip(me.named_parameters(), mc.named_parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6, msg=n)


def test_compiled_step_draws_fresh_noise_every_step_and_the_eager_draws():
    """lr = 0, so every step sees the same weights: the noisy gradient minus the noise-free one is the
    step's noise, which must be σC/B̄ · philox_normal(seed, step, stream) for each parameter — a new draw
    at every step (a graph that baked one step's counter in would repeat it) — and the eager run's."""
    sigma, C, Bbar = 1.3, 0.05, 6
    runs = {}
    for name, noise, compile_ in (("eager", sigma, False), ("compiled", sigma, True), ("clean", 0.0, True)):
        ((model, opt), _), batch = _pair("gpt", lr=0.0, noise_multiplier=noise)
        x, y = batch(6, 0)
        _step(model, opt, x, y)
        run = torch.compile(model, fullgraph=True) if compile_ else model
        grads = []
        for _ in range(1, 4):
            _step(run, opt, x, y)
            grads.append(_grads(model))
        runs[name] = (grads, {n: opt._streams[id(p)] for n, p in model.named_parameters() if p.requires_grad})
    (eager, streams), (compiled, _), (clean, _) = runs["eager"], runs["compiled"], runs["clean"]
    std = sigma * C / Bbar
    for s, (ge, gc, g0) in enumerate(zip(eager, compiled, clean), start=1):
        for n in gc:
            noise = gc[n] - g0[n]
            expected = std * philox_normal(noise.numel(), PhiloxKey(SEED, s, streams[n])).view(noise.shape)
            torch.testing.assert_close(noise, expected, rtol=0, atol=2e-5 * std, msg=f"{n} step {s}")
            torch.testing.assert_close(gc[n], ge[n], rtol=0, atol=2e-5 * std, msg=f"{n} step {s}")
    for n in compiled[0]:
        assert not torch.allclose(compiled[0][n], compiled[1][n]), n  # step 2's noise is not step 1's


def test_a_new_batch_size_reuses_the_graph():
    """Poisson batches vary in size: the batch dimension becomes symbolic after the first change
    (the guard reads B from the input inside the graph), so the sizes share one graph."""
    import torch._dynamo.utils as dynamo_utils

    ((me, oe), (mc, oc)), batch = _pair("mlp")
    x, y = batch(6, 0)
    for model, opt in ((me, oe), (mc, oc)):
        _step(model, opt, x, y)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    compiled = torch.compile(mc, fullgraph=True)
    for s, B in enumerate((6, 8, 5, 9, 7, 4)):
        x, y = batch(B, s)
        _step(me, oe, x, y)
        _step(compiled, oc, x, y)
        _assert_close(_grads(me), _grads(mc))
    assert dynamo_utils.counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("clipping", ["per_layer", "automatic"])
def test_compiled_clipping_styles(clipping):
    ((me, oe), (mc, oc)), batch = _pair("encoder", clipping=clipping)
    x, y = batch(6, 0)
    for model, opt in ((me, oe), (mc, oc)):
        _step(model, opt, x, y)
    compiled = torch.compile(mc, fullgraph=True)
    for s in range(1, 3):
        x, y = batch(6, s)
        _step(me, oe, x, y)
        _step(compiled, oc, x, y)
        _assert_close(_grads(me), _grads(mc))


def test_compiled_gradient_accumulation():
    """Micro-batches through the compiled model, accumulate() between them: the eager logical step."""
    ((me, oe), (mc, oc)), batch = _pair("cnn")
    x, y = batch(6, 0)
    for model, opt in ((me, oe), (mc, oc)):
        _step(model, opt, x, y)
    compiled = torch.compile(mc)
    for _, run, opt in ((me, me, oe), (mc, compiled, oc)):
        opt.zero_grad()
        for k in range(3):
            x, y = batch(4, 10 + k)
            _loss(run(x), y).backward()
            if k < 2:
                opt.accumulate()
        opt.step()
    _assert_close(_grads(me), _grads(mc))


def test_the_probe_runs_inside_a_compiled_model_and_refusals_hold():
    """Compiled from the first call: the probe still runs (eager, before the graph), and a DP layer
    whose rows are not examples is still refused, by the probe and by the traced per-call check."""

    class Flattens(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, flatten: bool = False):
            if flatten:  # (B, T, d) -> (B·T, d): rows are positions
                return self.lin(x.reshape(-1, x.shape[-1])).sum()
            return self.lin(x).sum()

    torch.manual_seed(0)
    model = Flattens()
    model, _ = dpkernels.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
    )
    compiled = torch.compile(model)
    x = torch.randn(4, 5, 4)
    compiled(x).backward()
    assert model.lin._dp_collector.guard.probe_complete
    with pytest.raises(ValueError, match="flattened"):
        compiled(x, flatten=True)
    with pytest.raises(RuntimeError, match="outside a call of the model"):
        torch.compile(model.lin)(x)


def test_compiled_optimizer_step_runs_eagerly_and_the_wrapped_update_compiles():
    """torch.compile(optimizer.step) is the eager step (DPOptimizer.step stays out of graphs); the
    wrapped optimizer's own update compiles, and the pair equals the eager step with noise."""
    ((me, oe), (mc, oc)), batch = _pair("mlp", noise_multiplier=1.0)
    oc.original_optimizer.step = torch.compile(oc.original_optimizer.step)
    step = torch.compile(oc.step)
    for s in range(3):
        x, y = batch(6, s)
        _step(me, oe, x, y)
        oc.zero_grad()
        _loss(mc(x), y).backward()
        step()
        _assert_close(_grads(me), _grads(mc))
        for p, q in zip(me.parameters(), mc.parameters()):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)
    assert oc.steps_taken == 3


def test_record_op_is_an_ordered_effect_and_noise_ops_refuse_cuda_graphs():
    """What keeps the recording in a compiled backward (an effect: never dead-code eliminated) and what
    keeps a CUDA graph from replaying one step's noise key (cudagraph_unsafe)."""
    from torch._higher_order_ops.effects import _get_effect

    import dpkernels.autograd  # noqa: F401  (registers dpkernels::record)
    from dpkernels.ops._library import TABLE

    assert _get_effect(torch.ops.dpkernels.record.default) is not None
    assert torch.Tag.cudagraph_unsafe in torch.ops.dpkernels.record.default.tags
    for name, op in TABLE.items():
        if op.key_args:
            assert torch.Tag.cudagraph_unsafe in op.op.tags, name


def test_a_new_layout_under_compile_runs_the_probe_again(monkeypatch):
    """Position ids shared by the batch, (1, T), after steps with (B, T): the layer shows a layout the probe
    has not seen, so the compiled call runs the probe again (eager, after the graph), as an eager call does."""
    from dpkernels.engine import probe

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(20, 8), nn.Embedding(6, 8), nn.Linear(8, 3)

        def forward(self, ids, pos):
            return self.head(self.tok(ids) + self.pos(pos)).mean(dim=1)

    torch.manual_seed(0)
    model = Positions()
    model, opt = dpkernels.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
    )
    ids, y = torch.randint(0, 20, (4, 6)), torch.randint(0, 3, (4,))
    pos = torch.arange(6).expand(4, 6).contiguous()
    _step(lambda i: model(i, pos), opt, ids, y)
    runs = []
    monkeypatch.setattr(probe, "run_probe", lambda *a, _run=probe.run_probe: runs.append(1) or _run(*a))
    compiled = torch.compile(model)
    _step(lambda i: compiled(i, pos), opt, ids, y)
    assert not runs  # proven layouts: no probe
    _step(lambda i: compiled(i, pos[:1]), opt, ids, y)
    assert runs and model.pos._dp_collector.guard.proven[model.pos] == ("broadcast",)


def test_compile_is_refused_across_processes(tmp_path, monkeypatch):
    """distributed=True (here one gloo process): a compiled backward refuses to record, naming why,
    instead of running the ranks' hand-over inside a compiled graph."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ((_, _), (mc, oc)), batch = _pair("mlp", distributed=True)
        x, y = batch(6, 0)
        _step(mc, oc, x, y)  # eager: fine
        oc.zero_grad()
        with pytest.raises(RuntimeError, match="across processes"):
            _loss(torch.compile(mc)(x), y).backward()
    finally:
        dist.destroy_process_group()


def test_hugging_face_llama_with_a_tied_head_compiles_in_one_graph():
    """What HF Trainer's torch_compile=True does (torch.compile(model)) on a private Llama: the integration's
    layers (LlamaRMSNorm, the tied embedding and head, rotary attention's projections) in one graph, equal
    to the eager step."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import real_models

    model, batch, loss_fn = real_models.llama_tied()
    twin = copy.deepcopy(model)
    pairs = []
    for m in (model, twin):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
        pairs.append(dpkernels.make_private(m, opt, noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=6))
    (me, oe), (mc, oc) = pairs
    for m, o in pairs:
        o.zero_grad()
        loss_fn(m, batch).backward()
        o.step()
    compiled = torch.compile(mc, fullgraph=True)
    for m, o in ((me, oe), (compiled, oc)):
        o.zero_grad()
        loss_fn(m, batch).backward()
        o.step()
    _assert_close(_grads(me), _grads(mc))
