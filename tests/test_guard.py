"""The example guard: every row a DP layer clips is shown to be one example, or the model is refused.

The three silent leaks the real-models issue found (T5's relative bias with B = T, OPT's flattened
fc1/fc2, BERT's broadcast position embeddings) and constructions of the same kinds: flattened rows
that pass any size bound, ids with no batch dimension when B = T, sequence-first input with B = T,
rows that mix examples. Each is either exact (``dpkernels.verify`` against a float64 per-example
loop) or refused before any gradient is written.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpkernels
from dpkernels.nn import registry

import real_models

transformers = pytest.importorskip("transformers")


def _private(model, B, **kw):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B, backend="torch", **kw
    )


def _only_trainable(model: nn.Module, keep) -> nn.Module:
    for n, p in model.named_parameters():
        p.requires_grad_(keep(n))
    return model


def _assert_exact(report):
    assert report.ok, str(report)
    assert report.clipped_fraction >= 0.5, str(report)


# ---------------------------------------------------------------- the three silent cases ----


def test_t5_relative_bias_with_B_equal_T_is_exact():
    """B = T = 8: the (T, T) bucket matrix no longer passes as a batch; each example's bias gradient
    comes from its own attention scores."""
    model, batch, loss = real_models.t5(B=8, T=8, T_dec=8)
    _assert_exact(dpkernels.verify(model, loss, batch, backend="torch"))


def test_t5_relative_bias_without_its_integration_is_refused_with_B_equal_T(monkeypatch):
    """Unpatched (as for a T5 variant no integration knows), the bias embedding sees the (8, 8) bucket
    matrix; B = 8 gives it the right size, and the probe refuses it because its rows do not follow
    the examples."""
    monkeypatch.delitem(registry._BY_NAME, "transformers.models.t5.modeling_t5.T5Attention")
    model, batch, loss = real_models.t5(B=8, T=8, T_dec=8)
    model, _ = _private(model, 8)
    with pytest.raises(ValueError, match=r"relative_attention_bias' \(DPEmbedding\).*do not follow the examples"):
        loss(model, batch)


def test_opt_with_only_fc1_fc2_trainable_is_exact():
    """B = 8, T = 4: OPT flattens to 32 rows before fc1/fc2, which its integration declares, so the 32
    rows are clipped as 8 examples of 4 rows (not as 32 'examples' under a size bound of 38)."""
    model, batch, loss = real_models.opt(B=8, T=4)
    _only_trainable(model, lambda n: ".fc1." in n or ".fc2." in n)
    _assert_exact(dpkernels.verify(model, loss, batch, backend="torch"))


def test_opt_flattened_layers_without_the_declaration_are_refused(monkeypatch):
    monkeypatch.delitem(registry._BY_NAME, "transformers.models.opt.modeling_opt.OPTDecoderLayer")
    model, batch, loss = real_models.opt(B=8, T=4)
    _only_trainable(model, lambda n: ".fc1." in n or ".fc2." in n)
    model, _ = _private(model, 8)
    with pytest.raises(ValueError, match=r"got input of shape \(32, 32\): 32 = 8 × 4 rows.*declare_flattened"):
        loss(model, batch)


def test_bert_with_only_position_embeddings_trainable_is_exact():
    """(1, T) position ids broadcast over the batch: expanded before the lookup, so each example keeps
    its own gradient (the broadcast's backward would have summed them)."""
    model, batch, loss = real_models.bert(B=6, T=7)
    _only_trainable(model, lambda n: "position_embeddings" in n)
    _assert_exact(dpkernels.verify(model, loss, batch, backend="torch"))


# ---------------------------------------------------------------- constructed cases ---------


class Flattening(nn.Module):
    """(B, T, d) reshaped to (B·T, d) before a linear layer, batch-major or position-major."""

    def __init__(self, position_major: bool = False) -> None:
        super().__init__()
        self.position_major = position_major
        self.proj = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        B, T, d = x.shape
        if self.position_major:
            h = self.proj(x.transpose(0, 1).reshape(T * B, d)).view(T, B, -1).transpose(0, 1)
        else:
            h = self.proj(x.reshape(B * T, d)).view(B, T, -1)
        return self.head(torch.tanh(h).mean(1))


def _xy(B, T, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, d, generator=g), torch.randint(0, 3, (B,), generator=g)


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def test_flattened_rows_that_pass_any_size_bound_are_refused():
    """B = 64, T = 2: 128 rows, below the old B̄ + 8√B̄ + 8 bound (136) for expected_batch_size=64."""
    model, _ = _private(Flattening(), 64)
    x, _ = _xy(64, 2)
    with pytest.raises(ValueError, match=r"'proj' \(DPLinear\) got input of shape \(128, 5\): 128 = 64 × 2 rows"):
        model(x)


def test_declared_flattened_rows_are_exact_and_position_major_ones_refused():
    model = Flattening()
    dpkernels.nn.declare_flattened(model.proj)
    _assert_exact(dpkernels.verify(model, _ce, _xy(6, 4), backend="torch"))
    wrong = Flattening(position_major=True)
    dpkernels.nn.declare_flattened(wrong.proj)
    wrong, _ = _private(wrong, 6)
    with pytest.raises(ValueError, match=r"'proj' \(DPLinear\).*layout 'flattened'.*do not follow the examples"):
        wrong(_xy(6, 4)[0])


class Positions(nn.Module):
    """Token embeddings plus position embeddings looked up with ids of shape ``ids_shape``."""

    def __init__(self, ids_shape: str) -> None:
        super().__init__()
        self.ids_shape = ids_shape
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Embedding(16, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        B, T = ids.shape
        p = torch.arange(T, device=ids.device)
        p = {"(1,T)": p[None], "(T,)": p, "(B,T)": p.expand(B, T)}[self.ids_shape]
        return self.head(torch.tanh(self.tok(ids) + self.pos(p)).mean(1))


def _ids(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (B, T), generator=g), torch.randint(0, 3, (B,), generator=g)


@pytest.mark.parametrize("ids_shape", ["(1,T)", "(B,T)"])
def test_broadcast_and_expanded_position_ids_are_exact(ids_shape):
    _assert_exact(dpkernels.verify(Positions(ids_shape), _ce, _ids(6, 6), backend="torch"))


@pytest.mark.parametrize("B,T", [(6, 6), (6, 4)])
def test_position_ids_without_a_batch_dimension_are_refused(B, T):
    """(T,) ids: with B = T the size matches, and the probe sees the rows do not follow the examples."""
    model, _ = _private(Positions("(T,)"), B)
    match = r"'pos' \(DPEmbedding\).*do not follow the examples" if B == T else r"'pos' \(DPEmbedding\).*B = 6"
    with pytest.raises(ValueError, match=match):
        model(_ids(B, T)[0])


def test_sequence_first_input_with_B_equal_T():
    """(T, B) ids into a sequence-first TransformerEncoder, B = T = 5: exact with batch_first=False;
    refused with batch_first=True, where the probe sees positions mixed by the attention."""
    model, batch, loss = real_models.torch_encoder(B=5, T=5, batch_first=False)
    _assert_exact(dpkernels.verify(model, loss, batch, batch_first=False, backend="torch"))
    wrong, _ = _private(copy.deepcopy(model), 5, batch_first=True)
    with pytest.raises(ValueError, match="do not follow the examples"):
        loss(wrong, batch)


class BatchStatistic(nn.Module):
    """Centres the batch (x − mean over examples) before a linear layer: examples are mixed."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 3)

    def forward(self, x):
        return self.proj(x - x.mean(dim=0, keepdim=True)).mean(1)


def test_rows_that_mix_examples_are_refused():
    model, _ = _private(BatchStatistic(), 6)
    with pytest.raises(ValueError, match=r"'proj' \(DPLinear\).*do not follow the examples"):
        model(_xy(6, 3)[0])


class HeldMask(nn.Module):
    """A per-example mask held by the model instead of passed with the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 3)
        self.register_buffer("mask", torch.linspace(0.0, 1.0, 6)[:, None, None])

    def forward(self, x):
        return (self.proj(x) * self.mask).mean(1)


def test_per_example_state_held_by_the_model_is_refused():
    model, _ = _private(HeldMask(), 6)
    with pytest.raises(ValueError, match="the model mixes the examples|mask stored on the model"):
        model(_xy(6, 3)[0])


def test_a_dp_layer_called_outside_the_model_is_refused():
    model, _ = _private(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), 4)
    with pytest.raises(RuntimeError, match="ran outside a call of the model given to make_private"):
        model[0](torch.randn(4, 5))


def test_a_call_without_tensors_is_refused():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, n):
            return self.lin(torch.randn(n, 5))

    model, _ = _private(Dict(), 4)
    with pytest.raises(ValueError, match="no batched tensor argument"):
        model(4)


# ---------------------------------------------------------------- the probe itself ----------


def test_the_probe_leaves_the_rng_and_training_mode_alone():
    """Dropout draws the same masks with and without make_private's first-step probe."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 9), nn.Dropout(0.5), nn.Linear(9, 3))
    x = torch.randn(6, 5)
    plain = copy.deepcopy(base)
    torch.manual_seed(1)
    expected = plain(x)
    model, _ = _private(copy.deepcopy(base), 6)
    torch.manual_seed(1)
    out = model(x)
    torch.testing.assert_close(out, expected)
    assert model.training and model[1].training


def test_the_probe_runs_at_the_first_step_only():
    calls = []
    model = Positions("(1,T)")
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    model, opt = _private(model, 6)
    ids, y = _ids(6, 5)
    for _ in range(2):
        F.cross_entropy(model(ids), y).backward()
        opt.step()
        opt.zero_grad()
    assert len(calls) == 3 + 1 + 1  # the probe's three calls at the first step, then one call per step


def test_a_batch_of_identical_examples_is_probed_again_later():
    model, opt = _private(nn.Sequential(nn.Linear(5, 3)), 4)
    same = torch.randn(1, 5).expand(4, 5)
    model(same).sum().backward()
    opt.step()
    assert not opt.collector.guard.probe_complete  # nothing could show the examples are not mixed
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    assert opt.collector.guard.probe_complete


def test_batch_of_one_needs_no_probe_and_later_batches_get_one():
    model, opt = _private(Positions("(1,T)"), 4)
    ids, y = _ids(1, 5)
    F.cross_entropy(model(ids), y).backward()
    opt.step()
    assert not opt.collector.guard.proven
    ids, y = _ids(4, 5)
    F.cross_entropy(model(ids), y).backward()
    opt.step()
    assert opt.collector.guard.proven[model.pos] == ("broadcast",)


def test_lora_frozen_base_layers_do_no_norm_work():
    pytest.importorskip("peft")
    model, batch, loss = real_models.lora_llama(B=4, T=5)
    model, opt = _private(model, 4)
    loss(model, batch).backward()
    recorded = set(opt.collector.records)
    assert recorded and all("lora_" in name for name in recorded)
    opt.step()


class OneRowForAll(nn.Module):
    """Looks up (1, T) position ids (expanded to the batch by the guard), then uses one row of the
    result for every example: forward, the B expanded rows are equal and nothing differs; backward,
    that row would carry every example's gradient."""

    def __init__(self, row: int, per_example_output: bool = True) -> None:
        super().__init__()
        self.row = row
        self.per_example_output = per_example_output
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Embedding(16, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids, y=None):
        T = ids.shape[1]
        pos = self.pos(torch.arange(T, device=ids.device)[None])
        out = self.head(torch.tanh(self.tok(ids) + pos[self.row]).mean(1))
        return out if self.per_example_output else F.cross_entropy(out, y)


@pytest.mark.parametrize("row", [0, -1])
def test_one_row_of_a_broadcast_input_used_for_every_example_is_refused(row):
    model, _ = _private(OneRowForAll(row), 6)
    with pytest.raises(ValueError, match=r"'pos' \(DPEmbedding\): example \d's outputs send gradient to its row"):
        model(_ids(6, 5)[0])


def test_a_broadcast_input_needs_a_per_example_output_to_be_checked():
    model, _ = _private(OneRowForAll(0, per_example_output=False), 6)
    ids, y = _ids(6, 5)
    with pytest.raises(ValueError, match=r"DP layers pos take an input shared by every example.*no per-example output"):
        model(ids, y)


class OneRowOfALayer(nn.Module):
    """Uses example 0's row of a linear layer for every example (no broadcast involved)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.proj(x)
        return self.head(torch.tanh(h + h[:1]).mean(1))


def test_a_row_used_by_other_examples_is_refused():
    model, _ = _private(OneRowOfALayer(), 6)
    with pytest.raises(ValueError, match=r"'proj' \(DPLinear\)"):
        model(_xy(6, 3)[0])
