"""The GPT-2 task of ``python -m dpkernels.demo --model gpt2``: text that ships with Python itself.

Corpus: the docstrings of a fixed list of standard-library modules (the module's own and those
of its public functions and classes), in a fixed order, with exact duplicates dropped
(``inspect.getdoc`` hands a class without a docstring its base class's). Nothing is
downloaded; the text is whatever this Python's standard library says, so it is fixed for a
given Python version.

Tokens: the UTF-8 bytes of that text, so the vocabulary is the 256 byte values and no
tokenizer is needed. The byte stream is cut into chunks of T tokens, and each chunk is one
example. Every example therefore holds the same number of predicted tokens (T − 1: the model
predicts byte t + 1 from bytes ≤ t), so the model's token-mean loss over a batch equals the
mean of the per-example losses, which is the ``loss_reduction="mean"`` that ``make_private``
assumes. Held-out perplexity is exp(mean per-token loss) over a deterministic 10 % of the
chunks; a model that guesses every byte uniformly has perplexity 256.

Model: a small, randomly initialised ``transformers.GPT2LMHeadModel`` with its own output
layer (``tie_word_embeddings=False``: make_private refuses a parameter shared by two layers, and
tied input/output embeddings are exactly that).
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Iterator, List, Tuple

import torch
import torch.nn as nn

VOCAB_SIZE = 256  # byte values; no special tokens: every example is a full chunk of text

STDLIB_MODULES = (
    "argparse",
    "bisect",
    "collections",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "textwrap",
    "typing",
    "unittest",
    "urllib.parse",
)


def _public_members(module: object) -> Iterator[object]:
    """The module's public functions and classes: those in ``__all__`` if it has one, else the
    non-underscore names defined in the module itself; sorted by name."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n in dir(module)
            if not n.startswith("_") and getattr(getattr(module, n), "__module__", None) == module.__name__
        ]
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if inspect.isclass(obj) or inspect.isroutine(obj):
            yield obj


def stdlib_docstrings(module_names: Tuple[str, ...] = STDLIB_MODULES) -> List[str]:
    """Docstrings of the modules in ``module_names`` (those that import), in order, each
    module's own first, exact duplicates dropped."""
    docs: List[str] = []
    seen = set()
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in (module, *_public_members(module)):
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def byte_chunks(text: str, seq_len: int) -> torch.Tensor:
    """``text``'s UTF-8 bytes cut into consecutive chunks of ``seq_len`` tokens, as an
    (n_chunks, seq_len) int64 tensor; the incomplete tail is dropped."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    n_chunks = len(data) // seq_len
    return data[: n_chunks * seq_len].view(n_chunks, seq_len).long()


def load_stdlib_text_split(
    device: torch.device, seq_len: int = 64, held_out: float = 0.1, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) chunks of the standard-library docstrings (joined by blank lines),
    split by a permutation with a fixed seed; ``held_out`` of the chunks are held out."""
    chunks = byte_chunks("\n\n".join(stdlib_docstrings()), seq_len)
    perm = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))
    n_held_out = max(1, round(held_out * len(chunks)))
    test, train = perm[:n_held_out], perm[n_held_out:]
    return chunks[train].to(device), chunks[test].to(device)


def require_transformers() -> None:
    """Exit with the install command if transformers (the demo extra's) is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise SystemExit("--model gpt2 needs Hugging Face transformers: pip install -e .[demo]") from e


def make_gpt2(seed: int, seq_len: int, n_embd: int = 64, n_layer: int = 2, n_head: int = 4) -> nn.Module:
    """A randomly initialised byte-level GPT-2 (torch seed ``seed``) with untied output layer.

    Dropout is off (``*_pdrop=0``): the demo's runs are a few hundred steps on a corpus the
    model underfits, where dropout only slows learning, and the private run is regularised by
    its noise already; without it the two runs differ by privacy alone.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=seq_len,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # what transformers falls back to anyway, after a warning
    if model.lm_head.weight is model.transformer.wte.weight:  # pragma: no cover
        raise RuntimeError("GPT-2's output layer shares the token embedding; make_private refuses shared parameters")
    return model


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy of a (B, T) batch: HF shifts the labels internally, and
    with T − 1 predictions per example this token mean is the mean of the per-example losses."""
    return model(input_ids=tokens, labels=tokens).loss


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, batch_size: int = 256) -> float:
    """exp(mean next-byte cross-entropy) over the (n, T) chunks ``tokens``, in eval mode.

    Every chunk has the same T − 1 predictions, so the mean of the batches' token means,
    weighted by their chunk counts, is the mean over all predicted tokens."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        total += lm_loss(model, batch).item() * len(batch)
    model.train(was_training)
    return math.exp(total / len(tokens))
