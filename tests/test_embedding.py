"""DPEmbedding end to end: norms, clipped sum and noise against the torch.func oracle, the module,
and a private step through make_private.

The norm kernel tiles the T×T plane and keeps the pairs of positions holding the same token;
the clipped sum scatters c_i·G_it rows into the table. Shapes where that goes wrong are
covered: B = 1, T = 1, 1-D and 3-D token tensors, p off the tile sizes, T spanning two tiles,
heavy repetition (a vocabulary of 5), padding, strided and int32 tokens.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn as nn

import dpkernels
from dpkernels import functional
from dpkernels.nn import DPEmbedding, convert
from dpkernels.ops import embedding_grads
from dpkernels.ops.philox import PhiloxKey
from helpers import assert_close_scaled, philox_noise, random_clip_factors
from oracle import embedding_per_example_grads as oracle_per_example_grads
from oracle import (
    batch_loss,
    embedding_clipped_sum_oracle,
    embedding_sq_norms_oracle,
    flat_clipped_mean,
    token_model_per_example_grads,
)

from conftest import triton_runnable

# ------------------------------------------------------------------ inputs ----------------


def make_inputs(case: str, device, dtype=torch.float32):
    """(tokens, grad_output, V) for a named case ``kind:B x T... x V x p``."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    kind, dims = case.split(":")
    n = [int(v) for v in dims.split("x")]
    V, p = n[-2], n[-1]
    B, positions = n[0], n[1:-2]
    scale = torch.linspace(0.5, 2.0, B).view(B, *([1] * (len(positions) + 1)))  # examples differ in size

    def grads(*shape):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    def ids(*shape):
        return torch.randint(0, V, shape, generator=gen).to(device)

    if kind == "ids":  # (B, *positions)
        return ids(B, *positions), grads(B, *positions, p), V
    if kind == "int32":
        return ids(B, *positions).int(), grads(B, *positions, p), V
    if kind == "strided":  # tokens a column slice of a wider tensor, G a permuted (T, B, p) tensor
        (T,) = positions
        tok = ids(B, 2 * T)[:, 1::2]
        g = grads(B, T, p).transpose(0, 1).contiguous().transpose(0, 1)
        return tok, g, V
    if kind == "seqfirst":  # tokens (T, B) transposed to (B, T): non-contiguous
        (T,) = positions
        return ids(T, B).t(), grads(B, T, p), V
    raise ValueError(case)


CASES = [
    "ids:3x37x5x20",  # T = 37 (one ghost tile of 64, partly masked); V = 5: every token repeats
    "ids:1x1x4x3",  # B = 1, T = 1
    "ids:4x6x33",  # 1-D tokens (B,): T = 1
    "ids:2x3x5x4x17",  # 3-D tokens (B, T1, T2)
    "ids:2x70x11x40",  # T = 70: a diagonal and an off-diagonal tile pair; p not a multiple of 16
    "ids:3x19x1000x16",  # a large vocabulary: few repeats
    "int32:3x21x6x24",
    "strided:3x9x7x24",
    "seqfirst:2x13x4x5",
]
PADDING = [None, 1, -1]  # -1 counts from the end, as in nn.Embedding
HALF_CASES = ["ids:3x37x5x20", "ids:2x70x11x40", "strided:3x9x7x24"]


def clip_factors(B: int, device) -> torch.Tensor:
    return random_clip_factors(B, device, seed=500)


_close = assert_close_scaled
_noise = philox_noise


# ------------------------------------------------------------------ squared norms ---------


def test_cases_are_what_they_say():
    tok, g, V = make_inputs("strided:3x9x7x24", "cpu")
    assert not tok.is_contiguous() and not g.is_contiguous() and tok.shape == (3, 9) and g.shape == (3, 9, 24)
    tok, g, _ = make_inputs("int32:3x21x6x24", "cpu")
    assert tok.dtype == torch.int32
    tok, _, _ = make_inputs("ids:3x37x5x20", "cpu")
    assert all(len(set(row.tolist())) < 37 for row in tok)  # repeated tokens in every example


@pytest.mark.parametrize("padding_idx", PADDING, ids=["nopad", "pad1", "pad-1"])
@pytest.mark.parametrize("case", CASES)
def test_sq_norms_float32_match_oracle(device, backend, case, padding_idx):
    tok, g, V = make_inputs(case, device)
    out = functional.embedding_sq_norms(tok, g, num_embeddings=V, padding_idx=padding_idx, backend=backend)
    ref = embedding_sq_norms_oracle(tok, g, V, padding_idx)
    assert out.dtype == torch.float32 and out.shape == (tok.shape[0],)
    _close(out, ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_sq_norms_half_precision(device, backend, case, dtype):
    # products of half values are exact in float32 and accumulation is float32: the oracle on the
    # rounded inputs is met to float32-ish accuracy; the bound leaves room for GPU dots
    tok, g, V = make_inputs(case, device, dtype)
    out = functional.embedding_sq_norms(tok, g, num_embeddings=V, padding_idx=2, backend=backend)
    assert out.dtype == torch.float32
    _close(out, embedding_sq_norms_oracle(tok, g, V, 2), 2e-3)


def test_repeated_tokens_add_up_before_squaring(device, backend):
    """One example, one token three times: ‖3G‖² = 9‖G‖², not 3‖G‖²; padding adds nothing."""
    row = torch.randn(1, 1, 8, device=device)
    g = row.expand(1, 4, 8)
    tok = torch.tensor([[3, 3, 0, 3]], device=device)
    out = functional.embedding_sq_norms(tok, g, num_embeddings=5, padding_idx=0, backend=backend)
    torch.testing.assert_close(out, 9 * row.square().sum().view(1), rtol=1e-5, atol=0)


def test_tile_pairs_without_a_matching_token(device, backend):
    """T = 70, distinct tokens: the off-diagonal tile pair has no (t, s) with equal tokens in example 0
    (the kernel skips its products), one in example 1, and only padding in example 2's second tile."""
    tok = torch.stack([torch.randperm(200, generator=torch.Generator().manual_seed(i))[:70] for i in range(3)]).to(
        device
    )
    tok[1, 66] = tok[1, 3]
    tok[2, 64:] = 0
    g = torch.randn(3, 70, 24, generator=torch.Generator().manual_seed(3)).to(device)
    out = functional.embedding_sq_norms(tok, g, num_embeddings=200, padding_idx=0, backend=backend)
    _close(out, embedding_sq_norms_oracle(tok, g, 200, 0), 1e-5)


def test_padding_only_and_zero_gradient_examples_have_zero_norm(device, backend):
    tok, g, V = make_inputs("ids:3x70x5x20", device)
    tok[1] = 2  # example 1: padding everywhere
    g[2] = 0.0  # example 2: no gradient
    out = functional.embedding_sq_norms(tok, g, num_embeddings=V, padding_idx=2, backend=backend)
    assert out[1].item() == 0.0 and out[2].item() == 0.0 and out[0].item() > 0


def test_empty_sequence(device, backend):
    tok = torch.zeros(2, 0, dtype=torch.long, device=device)
    g = torch.zeros(2, 0, 6, device=device)
    assert torch.equal(
        functional.embedding_sq_norms(tok, g, num_embeddings=4, backend=backend), torch.zeros(2, device=device)
    )
    key = PhiloxKey(3)
    out = functional.embedding_clipped_grad(
        tok, g, torch.ones(2, device=device), num_embeddings=4, noise_std=0.5, generator=key, backend=backend
    )
    _close(out, _noise(key, (4, 6), 0.5), 1e-6)


@pytest.mark.parametrize("case", ["ids:3x37x5x20", "ids:2x70x11x40", "ids:4x6x33"])
def test_backends_agree(device, case):
    if not triton_runnable(device):
        pytest.skip("Triton cannot run here")
    tok, g, V = make_inputs(case, device)
    c = clip_factors(tok.shape[0], device)
    key = PhiloxKey(2**63 + 7, 4, 9)
    outs = {}
    for b in ("torch", "triton"):
        outs[b] = (
            functional.embedding_sq_norms(tok, g, num_embeddings=V, padding_idx=0, backend=b),
            functional.embedding_clipped_grad(
                tok, g, c, num_embeddings=V, padding_idx=0, noise_std=1.5, generator=key, backend=b
            ),
        )
    for a, b in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ clipped sum and noise -


@pytest.mark.parametrize("padding_idx", [None, 1], ids=["nopad", "pad1"])
@pytest.mark.parametrize("case", CASES)
def test_clipped_sum_float32_matches_oracle(device, backend, case, padding_idx):
    tok, g, V = make_inputs(case, device)
    c = clip_factors(tok.shape[0], device)
    out = functional.embedding_clipped_grad(tok, g, c, num_embeddings=V, padding_idx=padding_idx, backend=backend)
    assert out.shape == (V, g.shape[-1]) and out.dtype == torch.float32 and out.device.type == device.type
    _close(out, embedding_clipped_sum_oracle(tok, g, c, V, padding_idx), 1e-5)
    if padding_idx is not None:
        assert not bool(out[padding_idx].any())  # no noise asked for: the padding row is exactly 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_clipped_sum_half_precision(device, backend, case, dtype):
    tok, g, V = make_inputs(case, device, dtype)
    c = clip_factors(tok.shape[0], device)
    ref = embedding_clipped_sum_oracle(tok, g, c, V, 0)
    out = functional.embedding_clipped_grad(tok, g, c, num_embeddings=V, padding_idx=0, backend=backend)
    assert out.dtype == dtype
    _close(out, ref, 1e-2)  # the float32 sum rounded once to the half dtype
    # float32 master weights: c·G and the sum stay in float32, nothing is rounded
    out32 = functional.embedding_clipped_grad(
        tok, g, c, num_embeddings=V, padding_idx=0, backend=backend, out_dtype=torch.float32
    )
    assert out32.dtype == torch.float32
    _close(out32, ref, 1e-5)


@pytest.mark.parametrize("case", ["ids:3x37x5x20", "ids:2x3x5x4x17", "strided:3x9x7x24", "ids:1x1x7x5"])
def test_noise_is_philox_of_the_key(device, backend, case):
    """grad = clipped sum + σ·z(key), element = row-major index in the table (odd V·p included)."""
    tok, g, V = make_inputs(case, device)
    c = clip_factors(tok.shape[0], device)
    key = PhiloxKey(0xFEEDFACECAFEBEEF, 12, 40)
    out = functional.embedding_clipped_grad(
        tok, g, c, num_embeddings=V, padding_idx=1, noise_std=0.37, generator=key, backend=backend
    )
    ref = embedding_clipped_sum_oracle(tok, g, c, V, 1).cpu() + _noise(key, out.shape, 0.37)
    _close(out, ref, 1e-5)


def test_noise_covers_rows_that_never_appear(device, backend):
    """Tokens 3 and 40 of a 50-row table: the other 48 rows (the padding row too) are pure noise."""
    tok = torch.tensor([[3, 3, 40], [40, 0, 0]], device=device)
    g = torch.randn(2, 3, 6, device=device)
    key = PhiloxKey(11, 2, 5)
    out = functional.embedding_clipped_grad(
        tok,
        g,
        torch.ones(2, device=device),
        num_embeddings=50,
        padding_idx=0,
        noise_std=2.0,
        generator=key,
        backend=backend,
    )
    z = _noise(key, (50, 6), 2.0)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[[3, 40]] = False
    _close(out.cpu()[untouched], z[untouched], 1e-6)
    assert bool((out.cpu()[untouched] != 0).all())
    _close(out, embedding_clipped_sum_oracle(tok, g, torch.ones(2), 50, 0).cpu() + z, 1e-5)


def test_zero_clip_factors_give_exactly_the_noise(device, backend):
    tok, g, V = make_inputs("ids:3x37x5x20", device)
    key = PhiloxKey(5, 0, 2)
    zero = torch.zeros(3, device=device)
    out = functional.embedding_clipped_grad(
        tok, g, zero, num_embeddings=V, noise_std=2.0, generator=key, backend=backend
    )
    _close(out, _noise(key, out.shape, 2.0), 1e-6)
    assert not bool(functional.embedding_clipped_grad(tok, g, zero, num_embeddings=V, backend=backend).any())


def test_fresh_noise_without_a_key_and_seeded_generator_reproduces(device, backend):
    tok, g, V = make_inputs("ids:3x37x5x20", device)
    c = clip_factors(3, device)

    def run(gen):
        return functional.embedding_clipped_grad(
            tok, g, c, num_embeddings=V, noise_std=1.0, generator=gen, backend=backend
        )

    assert not bool((run(None) == run(None)).any())
    assert torch.equal(run(torch.Generator().manual_seed(3)), run(torch.Generator().manual_seed(3)))


def test_clipped_sum_is_bit_for_bit_deterministic(device, backend):
    """4000 indices (above the 3072 of CUDA's direct path: the sorted one), 50 rows: run twice."""
    gen = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 50, (4, 1000), generator=gen).to(device)
    g = torch.randn(4, 1000, 40, generator=gen).to(device)
    c = clip_factors(4, device)
    runs = [
        functional.embedding_clipped_grad(
            tok, g, c, num_embeddings=50, noise_std=0.1, generator=PhiloxKey(1), backend=backend
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_calls_split_in_chunks_add_up(device, backend, monkeypatch):
    """Past 2³¹ elements the row sums are split into several calls: forced here with tiny chunks."""
    tok, g, V = make_inputs("ids:3x37x5x20", device)
    c = clip_factors(3, device)
    monkeypatch.setattr(embedding_grads, "MAX_ELEMENTS_PER_SCATTER", 100)  # 3 rows of 32 per call
    assert len(list(embedding_grads._row_chunks(111, 20))) == 37
    out = functional.embedding_clipped_grad(tok, g, c, num_embeddings=V, padding_idx=0, backend=backend)
    _close(out, embedding_clipped_sum_oracle(tok, g, c, V, 0), 1e-5)
    norms = functional.embedding_sq_norms(tok, g, num_embeddings=V, padding_idx=0, backend="torch")
    _close(norms, embedding_sq_norms_oracle(tok, g, V, 0), 1e-5)


def test_does_not_modify_inputs(device, backend):
    tok, g, V = make_inputs("strided:3x9x7x24", device)
    c = clip_factors(3, device)
    before = (tok.clone(), g.clone(), c.clone())
    functional.embedding_sq_norms(tok, g, num_embeddings=V, backend=backend)
    functional.embedding_clipped_grad(
        tok, g, c, num_embeddings=V, noise_std=1.0, generator=PhiloxKey(1), backend=backend
    )
    assert all(torch.equal(a, b) for a, b in zip(before, (tok, g, c)))


@pytest.mark.parametrize("case", ["ids:1x1x5x3", "ids:4x11x9x6", "ids:3x4x5x7x13", "int32:2x6x5x2"])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_per_example_grads_match_oracle(device, case, padding_idx):
    """The small-table path: (B, V, p) per-example gradients, repeated tokens summed, padding left out."""
    tokens, g, V = make_inputs(case, device)
    got = functional.embedding_per_example_grads(tokens, g, num_embeddings=V, padding_idx=padding_idx)
    B, p = g.shape[0], g.shape[-1]
    expected = oracle_per_example_grads(tokens, g, V, padding_idx).reshape(B, V, p).cpu()
    assert got.dtype == torch.float32 and got.shape == (B, V, p)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-6, atol=1e-6)
    norms = embedding_sq_norms_oracle(tokens, g, V, padding_idx)
    torch.testing.assert_close(got.flatten(1).square().sum(1).double().cpu(), norms.cpu(), rtol=1e-5, atol=1e-6)


def test_small_tables_take_the_per_example_path():
    """T5's relative buckets (32 rows looked up 64·64 times per example) take per-example gradients;
    a vocabulary does not; nor does a batch whose per-example gradients would pass 2²⁴ elements."""
    assert embedding_grads.choose_embedding_method(8, 64 * 64, 32, 8) == "per_example"
    assert embedding_grads.choose_embedding_method(8, 256, 50257, 768) == "rows"
    assert embedding_grads.choose_embedding_method(1024, 4096, 1024, 64) == "rows"


def test_shapes_on_the_meta_device():
    """The memory model (bench/memory_model.py) runs steps on meta tensors: no data, no data-dependent shapes."""
    tok = torch.empty(3, 7, dtype=torch.long, device="meta")
    g = torch.empty(3, 7, 5, device="meta")
    c = torch.empty(3, device="meta")
    assert functional.embedding_sq_norms(tok, g, num_embeddings=11, padding_idx=0).shape == (3,)
    out = functional.embedding_clipped_grad(tok, g, c, num_embeddings=11, noise_std=1.0, generator=PhiloxKey(1))
    assert out.shape == (11, 5) and out.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(4, 300, 1000, 384), (3, 130, 20, 200), (2, 257, 50000, 96)])
def test_autotuned_norm_kernel_on_gpu(shape, dtype, monkeypatch):
    """GPU only: the autotuned ghost kernel (tuning call, then a cached config) against the sort-based
    reference in float64 terms, and the clipped sum bit for bit equal across two runs."""
    monkeypatch.setenv("DPKERNELS_AUTOTUNE", "1")
    B, T, V, p = shape
    gen = torch.Generator().manual_seed(B * T)
    tok = torch.randint(0, V, (B, T), generator=gen).to("cuda")
    g = (torch.randn(B, T, p, generator=gen) / T).to("cuda", dtype)
    ref = functional.embedding_sq_norms(tok.cpu(), g.float().cpu(), num_embeddings=V, padding_idx=0, backend="torch")
    for _ in range(2):
        out = functional.embedding_sq_norms(tok, g, num_embeddings=V, padding_idx=0, backend="triton")
        torch.testing.assert_close(out.cpu(), ref, rtol=2e-3, atol=0.0)
    c = clip_factors(B, "cuda")
    runs = [
        functional.embedding_clipped_grad(
            tok, g, c, num_embeddings=V, noise_std=0.01, generator=PhiloxKey(3), backend="triton"
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


# ------------------------------------------------------------------ input errors ----------

OPS = {
    "sq_norms": lambda tok, g, **kw: functional.embedding_sq_norms(tok, g, **kw),
    "clipped_grad": lambda tok, g, **kw: functional.embedding_clipped_grad(
        tok, g, torch.ones(len(tok) if tok.dim() else 1), **kw
    ),
}


@pytest.mark.parametrize("op", OPS)
def test_bad_inputs_are_refused_with_clear_errors(op):
    call = OPS[op]
    tok, g = torch.randint(0, 5, (3, 4)), torch.randn(3, 4, 6)
    with pytest.raises(TypeError, match="integer token ids"):
        call(tok.float(), g, num_embeddings=5)
    with pytest.raises(TypeError, match="integer token ids"):
        call(tok.to(torch.uint8), g, num_embeddings=5)
    with pytest.raises(ValueError, match=r"tokens.shape \+ \(p,\)"):
        call(tok, torch.randn(3, 5, 6), num_embeddings=5)
    with pytest.raises(ValueError, match=r"tokens.shape \+ \(p,\)"):
        call(tok, torch.randn(3, 4), num_embeddings=5)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        call(torch.tensor(2), torch.randn(6), num_embeddings=5)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        call(tok, g.double(), num_embeddings=5)
    with pytest.raises(ValueError, match="grad_output is on meta"):
        call(tok, torch.empty(3, 4, 6, device="meta"), num_embeddings=5)
    with pytest.raises(ValueError, match="empty batch"):
        call(tok[:0], g[:0], num_embeddings=5)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, num_embeddings=4\), got ids from 0 to 4"):
        call(torch.tensor([[0, 4]]), torch.randn(1, 2, 6), num_embeddings=4)
    with pytest.raises(ValueError, match="got ids from -1 to 2"):
        call(torch.tensor([[2, -1]]), torch.randn(1, 2, 6), num_embeddings=4)
    for bad in (5, -6, 1.0, True):
        with pytest.raises(ValueError, match="padding_idx must be None or an int in"):
            call(tok, g, num_embeddings=5, padding_idx=bad)
    for bad in (0, 2.0, None):
        with pytest.raises(ValueError, match="num_embeddings must be a positive int"):
            call(tok, g, num_embeddings=bad)


def test_bad_clip_factors_noise_and_out_dtype():
    tok, g = torch.randint(0, 5, (3, 4)), torch.randn(3, 4, 6)
    with pytest.raises(ValueError, match=r"clip_factors must be a tensor of shape \(3,\)"):
        functional.embedding_clipped_grad(tok, g, torch.ones(4), num_embeddings=5)
    with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
        functional.embedding_clipped_grad(tok, g, torch.ones(3), num_embeddings=5, noise_std=-1.0)
    with pytest.raises(TypeError, match="out_dtype"):
        functional.embedding_clipped_grad(tok, g, torch.ones(3), num_embeddings=5, out_dtype=torch.int32)


# ------------------------------------------------------------------ the module ------------


def test_state_dict_and_constructor_match_nn_embedding():
    torch.manual_seed(0)
    ref = nn.Embedding(10, 4, padding_idx=-2, max_norm=1.5)
    torch.manual_seed(0)
    dp = DPEmbedding(10, 4, padding_idx=-2, max_norm=1.5)
    assert dp.padding_idx == 8 and repr(dp).replace("DPEmbedding", "Embedding") == repr(ref)
    sd, sd_ref = dp.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref) == ["weight"] and torch.equal(sd["weight"], sd_ref["weight"])
    other = nn.Embedding(10, 4)
    other.load_state_dict(dp.state_dict())
    dp.load_state_dict(nn.Embedding(10, 4).state_dict())


def test_from_embedding_shares_the_parameter_and_behaves_like_it_outside_an_engine():
    torch.manual_seed(1)
    emb = nn.Embedding(12, 5, padding_idx=3, max_norm=0.8, norm_type=1.5)
    emb_copy = copy.deepcopy(emb)
    dp = DPEmbedding.from_embedding(emb)
    assert dp.weight is emb.weight
    for attr in (
        "num_embeddings",
        "embedding_dim",
        "padding_idx",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "sparse",
    ):
        assert getattr(dp, attr) == getattr(emb, attr)
    tok = torch.tensor([[1, 3, 3, 7], [11, 1, 0, 3]])
    out, out_ref = dp(tok), emb_copy(tok)  # the same renorm applied to the same rows
    torch.testing.assert_close(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    torch.testing.assert_close(dp.weight.grad, emb_copy.weight.grad)
    model = convert(nn.Sequential(nn.Embedding(6, 3), nn.Linear(3, 2)))
    assert type(model[0]) is DPEmbedding


def _private(model, *, lr=0.1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    kw.setdefault("noise_multiplier", 0.0)
    kw.setdefault("max_grad_norm", 1.0)
    kw.setdefault("expected_batch_size", 8)
    return dpkernels.make_private(model, opt, **kw)


class BagOfTokens(nn.Module):
    """Embedding → mean over the positions → Linear. ``seq_first``: ids (T, B) instead of (B, T)."""

    def __init__(self, V=9, p=6, k=3, padding_idx=None, seq_first=False, **emb_kw):
        super().__init__()
        self.emb = nn.Embedding(V, p, padding_idx=padding_idx, **emb_kw)
        self.head = nn.Linear(p, k)
        self.seq_first = seq_first

    def forward(self, ids):
        return self.head(self.emb(ids).mean(dim=0 if self.seq_first else 1))


def _bag_data(device, B=5, T=11, V=9, k=3):
    gen = torch.Generator().manual_seed(7)
    tok = torch.randint(0, V, (B, T), generator=gen)
    tok[0, :6] = tok[0, 0]  # heavy repetition in one example
    return tok.to(device), torch.randint(0, k, (B,), generator=gen).to(device)


def _clip_norm_between(norms: torch.Tensor) -> float:
    s = norms.sort().values
    k = len(s) // 2
    return float(s[k - 1] + s[k]) / 2


@pytest.fixture(params=["rows", "per_example"])
def embedding_method(request, monkeypatch):
    """The DP layer's norm and clipped-sum path, forced: the row kernels, or per-example gradients of a small
    table (``choose_embedding_method`` picks the latter for these small tables on its own)."""
    import dpkernels.autograd.embedding as autograd_embedding

    monkeypatch.setattr(autograd_embedding, "choose_embedding_method", lambda *shape: request.param)
    return request.param


@pytest.mark.parametrize("padding_idx", [None, 2], ids=["nopad", "pad2"])
@pytest.mark.parametrize("seq_first", [False, True], ids=["batch_first", "seq_first"])
def test_private_step_equals_oracle(device, backend, padding_idx, seq_first, embedding_method):
    torch.manual_seed(0)
    model = BagOfTokens(padding_idx=padding_idx, seq_first=seq_first).to(device)
    tok, t = _bag_data(device)
    per_example = token_model_per_example_grads(model, tok, t, "ce", seq_first=seq_first)
    _, norms = flat_clipped_mean(per_example, 1.0, 1.0)
    C = _clip_norm_between(norms)  # some examples clipped, some not
    expected, _ = flat_clipped_mean(per_example, C, 8)
    model, opt = _private(model, max_grad_norm=C, batch_first=not seq_first, backend=backend)
    assert type(model.emb) is DPEmbedding
    batch_loss("ce", model(tok.t() if seq_first else tok), t, "mean").backward()
    opt.step()
    for name, p in model.named_parameters():
        ref = expected[name]
        torch.testing.assert_close(p.grad.double().cpu(), ref.cpu(), rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_private_step_noise_is_the_counter_scheme(device, backend, embedding_method):
    """σ > 0: the table's gradient minus the noiseless one is σC/B̄·z(seed, step, stream 0), every row,
    whichever path clipped it."""
    tok, t = _bag_data(device)
    grads = []
    for sigma in (0.0, 1.3):
        torch.manual_seed(0)
        model, opt = _private(
            BagOfTokens(V=40).to(device),
            noise_multiplier=sigma,
            max_grad_norm=0.7,
            expected_batch_size=6,
            seed=2024,
            backend=backend,
        )
        batch_loss("ce", model(tok), t, "sum").backward()
        opt.step()
        grads.append(model.emb.weight.grad.double().cpu())
    std = 1.3 * 0.7 / 6
    _close(grads[1] - grads[0], _noise(PhiloxKey(2024, 0, 0), (40, 6), std), 1e-4)
    assert not bool(grads[0][9:].any())  # rows 9..39 never appear: their gradient is noise alone


def test_gradient_accumulation_equals_one_step(device, backend, embedding_method):
    tok, t = _bag_data(device)
    steps = []
    for split in (False, True):
        torch.manual_seed(0)
        model, opt = _private(
            BagOfTokens().to(device), noise_multiplier=0.5, max_grad_norm=0.3, seed=3, backend=backend
        )
        parts = [(tok[:2], t[:2]), (tok[2:], t[2:])] if split else [(tok, t)]
        for i, (x, y) in enumerate(parts):
            batch_loss("ce", model(x), y, "sum").backward()
            if i < len(parts) - 1:
                opt.accumulate()
        opt.step()
        steps.append(model.emb.weight.grad.clone())
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-5, atol=1e-6)


def test_max_norm_is_allowed_under_an_engine(device, backend):
    """Forward renormalises the looked-up rows as nn.Embedding does; the gradient is that of the
    renormalised table (the renorm is not differentiated, as in torch)."""
    torch.manual_seed(0)
    model = BagOfTokens(max_norm=0.5).to(device)
    reference = copy.deepcopy(model)
    tok, t = _bag_data(device)
    model, opt = _private(model, max_grad_norm=0.2, backend=backend)
    out = model(tok)
    torch.testing.assert_close(out, reference(tok))  # reference's own forward renormalised its copy
    torch.testing.assert_close(model.emb.weight.detach(), reference.emb.weight.detach())
    reference.emb.max_norm = None
    expected, _ = flat_clipped_mean(token_model_per_example_grads(reference, tok, t, "ce"), 0.2, 8)
    batch_loss("ce", out, t, "mean").backward()
    opt.step()
    torch.testing.assert_close(model.emb.weight.grad.double().cpu(), expected["emb.weight"].cpu(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("scale_grad_by_freq", "scale_grad_by_freq=True .*other examples' tokens .*not a per-example gradient"),
        ("sparse", "sparse=True .*dense .*the noise covers every row"),
    ],
)
def test_scale_grad_by_freq_and_sparse_are_refused(flag, message):
    # by make_private, naming the layer
    with pytest.raises(ValueError, match=f"DPEmbedding 'emb' \\(weight\\): {message}"):
        _private(BagOfTokens(**{flag: True}))
    # and by the forward, if the flag is switched on after make_private
    model, opt = _private(BagOfTokens())
    setattr(model.emb, flag, True)
    assert message.split(" ")[0] in model.emb.dp_unsupported_reason()
    tok, t = _bag_data("cpu")
    with pytest.raises(ValueError, match=f"DPEmbedding 'emb' cannot be trained privately: {message}"):
        model(tok)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():  # not a private forward: plain nn.Embedding
        model(tok)
    assert DPEmbedding(3, 2).dp_unsupported_reason() is None


def test_empty_and_unbatched_token_ids_are_refused():
    model, _ = _private(BagOfTokens())
    with pytest.raises(ValueError, match="empty batch reached DPEmbedding"):
        model(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"batched token ids of shape \(B,\)"):
        model(torch.tensor(3))
