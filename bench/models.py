"""Models for the full-step benchmark (self-contained, plain torch).

Every private engine benchmarked (dpkernels, Opacus, the torch.func oracle) clips exactly the
same parameters. In the GPT of the issue's benchmark (``GPTConfig.train_all=False``) the token and
position embeddings and the LayerNorms are frozen (``requires_grad_(False)``), so every trainable
parameter lives in an ``nn.Linear``; ``train_all=True`` trains them too (dpkernels' DPEmbedding
and DPLayerNorm, Opacus' own per-sample gradient samplers).

Both models map (B, T) or (B, T, d) inputs to logits (B, T, V) (T may be 1 for the stack) so
that one loss serves every mode: cross-entropy over the last dimension, averaged over the
tokens of an example and then over the batch (``lm_loss``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------ linear stack ----------


@dataclass(frozen=True)
class StackConfig:
    width: int = 1024
    depth: int = 8
    batch: int = 256
    seq: int = 1  # T = 1: input (B, width); T > 1: input (B, T, width)

    def describe(self) -> str:
        shape = f"B={self.batch}" + (f", T={self.seq}" if self.seq > 1 else ", T=1")
        return f"{self.depth} x Linear({self.width},{self.width}) + ReLU, {shape}"


class LinearStack(nn.Module):
    """``depth`` Linear(width, width) layers with ReLU between them; the last one's output are
    the logits of a ``width``-way classification."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(nn.Linear(cfg.width, cfg.width) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = F.relu(x)
        return x


# ------------------------------------------------------------------ GPT -------------------


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 50257
    seq: int = 256
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    d_mlp: int = 3072
    batch: int = 32
    train_all: bool = False  # False: embeddings and LayerNorms frozen (the benchmark)
    tied: bool = False  # the head's weight is the token embedding (GPT-2's LM head); needs train_all

    def describe(self) -> str:
        frozen = "all parameters trained" if self.train_all else "embeddings and LayerNorms frozen"
        if self.tied:
            frozen += ", head tied to the token embedding"
        return (
            f"GPT d={self.d_model}, {self.n_layer} layers, {self.n_head} heads, MLP {self.d_mlp}, "
            f"vocab {self.vocab}, T={self.seq}, B={self.batch}, {frozen}"
        )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: a packed QKV Linear, SDPA, an output Linear."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError("d_model must be divisible by n_head")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.n_head
        q, k, v = self.qkv(x).split(D, dim=-1)
        q = q.reshape(B, T, h, D // h).transpose(1, 2)
        k = k.reshape(B, T, h, D // h).transpose(1, 2)
        v = v.reshape(B, T, h, D // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """A GPT-2-shaped decoder, its head untied unless ``cfg.tied``; embeddings and LayerNorms frozen unless
    ``cfg.train_all``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.apply(self._init)
        if cfg.tied:
            if not cfg.train_all:
                raise ValueError("a tied head needs train_all=True (its weight is the trained token embedding)")
            self.head.weight = self.tok_emb.weight
        if not cfg.train_all:
            for m in self.modules():
                if isinstance(m, (nn.Embedding, nn.LayerNorm)):
                    m.requires_grad_(False)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.02)  # never zero: zeros can hide bugs and run faster
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        # positions per example (B, T), not (T,): a trained position embedding needs the batch
        # dimension to have per-example gradients
        pos = torch.arange(T, device=idx.device).expand(B, T).contiguous()  # (Opacus ghost clipping views it)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# ------------------------------------------------------------------ the demo's models -----


@dataclass(frozen=True)
class DemoConfig:
    """The README demo's MLP 64-256-256-10 or CNN (two Conv2d + GroupNorm, a Linear) on 8×8 inputs."""

    model: str = "mlp"
    batch: int = 128
    classes: int = 10
    seq: int = 1

    def describe(self) -> str:
        from dpkernels.demo import MODELS

        return f"demo {MODELS[self.model]}, B={self.batch}"


# ------------------------------------------------------------------ shared helpers --------


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every token (= mean over examples of the per-example token mean,
    since every example has the same T). Works for (B, V) / (B,) and (B, T, V) / (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def build(kind: str, cfg, *, seed: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The same initial weights for a given seed, on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    if kind == "demo":
        from dpkernels.demo import make_model

        return make_model(seed, cfg.model).to(device=device, dtype=dtype)
    with torch.device(device):  # initialise on the device: fast, and the same for every mode
        model = LinearStack(cfg) if kind == "stack" else GPT(cfg)
    return model.to(dtype=dtype)


def make_batch(kind: str, cfg, *, seed: int, device: torch.device, dtype: torch.dtype):
    """Random (never zero) inputs and random targets for one step."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "demo":  # digits-like pixels in [0, 1]
        x = torch.rand(cfg.batch, 64, generator=g).to(device=device, dtype=dtype)
        return x, torch.randint(0, cfg.classes, (cfg.batch,), generator=g).to(device)
    if kind == "stack":
        shape = (cfg.batch, cfg.width) if cfg.seq == 1 else (cfg.batch, cfg.seq, cfg.width)
        x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, cfg.width, shape[:-1], generator=g).to(device)
    else:
        x = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)
        y = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)
    return x, y


def linear_layers(kind: str, cfg):
    """(name, d_in, d_out, T) of every trainable Linear, from a model built on the meta device."""
    with torch.device("meta"):
        model = LinearStack(cfg) if kind == "stack" else GPT(cfg)
    T = cfg.seq
    return [
        (name, m.in_features, m.out_features, T)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad
    ]  # (embeddings and LayerNorms, trained with train_all, are not in the GEMM floor)


def attention_flops(kind: str, cfg) -> float:
    """FLOPs of the attention matmuls (QKᵀ and PV) of one forward, causal (half the plane)."""
    if kind != "gpt":
        return 0.0
    return cfg.n_layer * 2 * (2.0 * cfg.batch * cfg.seq * cfg.seq * cfg.d_model) / 2


def config_dict(cfg) -> dict:
    return asdict(cfg)


__all__ = [
    "StackConfig",
    "LinearStack",
    "GPTConfig",
    "GPT",
    "DemoConfig",
    "lm_loss",
    "build",
    "make_batch",
    "linear_layers",
    "attention_flops",
    "config_dict",
]
