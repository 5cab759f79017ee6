"""Tiny random-init configs of real model classes (no downloads), with a batch and a loss each.

Each ``CASES`` entry builds (model, batch, loss_fn) for ``dpkernels.verify``: the model as its
library builds it (Hugging Face transformers, timm, peft, torch). The ``*_tied`` and ``*_all``
cases train every parameter, tied embeddings and bare parameters included; the others keep the
original issue's frozen ones (T5's ``shared``, ViT's bare tokens) so both paths stay covered.
Batches have no padding, so a token-mean loss is a mean over examples. Imports happen inside the builders: a
missing library skips only its cases.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_import import import_timm

V, D, HEADS, FF, LAYERS = 97, 32, 4, 37, 2
Case = Tuple[nn.Module, Any, Callable[[nn.Module, Any], torch.Tensor]]


def _ids(B: int, T: int, seed: int = 0, low: int = 1) -> torch.Tensor:
    return torch.randint(low, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _classify(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits, labels)


def _lm(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss  # the model's own token mean: every example has the same token count


def _labels(B: int, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, n, (B,), generator=torch.Generator().manual_seed(seed))


def _text_classification(model: nn.Module, B: int, T: int) -> Case:
    batch = {"input_ids": _ids(B, T), "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": _labels(B)}
    return model, batch, _classify


def _causal_lm(model: nn.Module, B: int, T: int) -> Case:
    ids = _ids(B, T)
    return model, {"input_ids": ids, "labels": ids.clone()}, _lm


def gpt2(B: int = 6, T: int = 7) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        n_layer=LAYERS,
        n_embd=D,
        n_head=HEADS,
        vocab_size=V,
        n_positions=64,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return _text_classification(tf.GPT2ForSequenceClassification(cfg), B, T)


def _encoder_cfg(tf, cls):
    return cls(
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FF,
        vocab_size=V,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
    )


def bert(B: int = 6, T: int = 7) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    return _text_classification(tf.BertForSequenceClassification(_encoder_cfg(tf, tf.BertConfig)), B, T)


def roberta(B: int = 6, T: int = 7) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    return _text_classification(tf.RobertaForSequenceClassification(_encoder_cfg(tf, tf.RobertaConfig)), B, T)


def distilbert(B: int = 6, T: int = 7) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.DistilBertConfig(
        dim=D,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=FF,
        vocab_size=V,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
    )
    return _text_classification(tf.DistilBertForSequenceClassification(cfg), B, T)


def _decoder_cfg(cls, **extra):
    return cls(
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        vocab_size=V,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


def llama(B: int = 6, T: int = 7) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    return _causal_lm(tf.LlamaForCausalLM(_decoder_cfg(tf.LlamaConfig)), B, T)


def qwen2(B: int = 6, T: int = 7) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    return _causal_lm(tf.Qwen2ForCausalLM(_decoder_cfg(tf.Qwen2Config)), B, T)


def mistral(B: int = 6, T: int = 7) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    return _causal_lm(tf.MistralForCausalLM(_decoder_cfg(tf.MistralConfig)), B, T)


def gemma(B: int = 6, T: int = 7) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GemmaForCausalLM(_decoder_cfg(tf.GemmaConfig, head_dim=8))
    with torch.no_grad():  # Gemma initialises its (1 + w) norm weights to zero: make them say something
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)
    return _causal_lm(model, B, T)


def t5(B: int = 6, T: int = 7, T_dec: int = 5) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.T5Config(
        d_model=D,
        d_ff=FF,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=HEADS,
        d_kv=8,
        vocab_size=V,
        relative_attention_num_buckets=8,
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    model = tf.T5ForConditionalGeneration(cfg)
    model.shared.weight.requires_grad_(False)  # shared by the encoder's and decoder's embeddings: next issue
    batch = {
        "input_ids": _ids(B, T),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "labels": _ids(B, T_dec, seed=3),
    }
    return model, batch, _lm


def opt(B: int = 6, T: int = 7) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OPTConfig(
        hidden_size=D,
        ffn_dim=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        vocab_size=V,
        max_position_embeddings=64,
        word_embed_proj_dim=D,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    model = tf.OPTForCausalLM(cfg)
    ids = _ids(B, T)
    return model, {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": ids.clone()}, _lm


def gpt2_lm(B: int = 6, T: int = 7) -> Case:
    """GPT-2's LM head model: the head's weight is the token embedding (tied)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        n_layer=LAYERS, n_embd=D, n_head=HEADS, vocab_size=V, n_positions=64, bos_token_id=1, eos_token_id=1
    )
    model = tf.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    return _causal_lm(model, B, T)


def llama_tied(B: int = 6, T: int = 7) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    cfg = _decoder_cfg(tf.LlamaConfig)
    cfg.tie_word_embeddings = True
    model = tf.LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return _causal_lm(model, B, T)


def opt_tied(B: int = 6, T: int = 7) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OPTConfig(
        hidden_size=D,
        ffn_dim=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        vocab_size=V,
        max_position_embeddings=64,
        word_embed_proj_dim=D,
        pad_token_id=0,
    )
    model = tf.OPTForCausalLM(cfg)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    ids = _ids(B, T)
    return model, {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": ids.clone()}, _lm


def t5_tied(B: int = 6, T: int = 7, T_dec: int = 5) -> Case:
    """T5 with ``shared`` trainable: one table behind the encoder's and decoder's embeddings and the head."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.T5Config(
        d_model=D,
        d_ff=FF,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=HEADS,
        d_kv=8,
        vocab_size=V,
        relative_attention_num_buckets=8,
        tie_word_embeddings=True,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    model = tf.T5ForConditionalGeneration(cfg)
    assert model.lm_head.weight is model.shared.weight is model.encoder.embed_tokens.weight
    batch = {
        "input_ids": _ids(B, T),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "labels": _ids(B, T_dec, seed=3),
    }
    return model, batch, _lm


def _images(B: int, size: int = 16) -> torch.Tensor:
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(0))


def hf_vit(B: int = 6) -> Case:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FF,
        num_labels=3,
    )
    model = tf.ViTForImageClassification(cfg)
    model.vit.embeddings.cls_token.requires_grad_(False)  # bare parameters: next issue
    model.vit.embeddings.position_embeddings.requires_grad_(False)
    return model, {"pixel_values": _images(B), "labels": _labels(B)}, _classify


def _timm_loss(model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def timm_vit(B: int = 6) -> Case:
    timm = import_timm()

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=D,
        depth=LAYERS,
        num_heads=HEADS,
        num_classes=3,
    )
    model.cls_token.requires_grad_(False)  # bare parameters: next issue
    model.pos_embed.requires_grad_(False)
    return model, (_images(B), _labels(B)), _timm_loss


def hf_vit_all(B: int = 6) -> Case:
    """HF ViT with every parameter trainable: the bare cls_token and position_embeddings too."""
    model, batch, loss = hf_vit(B)
    model.requires_grad_(True)
    return model, batch, loss


def timm_vit_all(B: int = 6) -> Case:
    """timm ViT with every parameter trainable, layer scale on (its γ vectors are trained too)."""
    timm = import_timm()

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=D,
        depth=LAYERS,
        num_heads=HEADS,
        num_classes=3,
        init_values=0.5,
    )
    return model, (_images(B), _labels(B)), _timm_loss


def timm_resnet(B: int = 4) -> Case:
    timm = import_timm()
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    # resnet18's layout with one block per stage; timm's GroupNorm class for every norm
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, norm_layer=timm.layers.get_norm_layer("groupnorm"))
    return model, (_images(B), _labels(B)), _timm_loss


def _lora(model: nn.Module, targets) -> nn.Module:
    import peft

    return peft.get_peft_model(
        model,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights="gaussian"),
    )


def _nonzero_lora_b(model: nn.Module) -> nn.Module:
    # peft starts lora_B at zero (the adapted model equals the base): give the test a nonzero one
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    return model


def lora_gpt2(B: int = 6, T: int = 7) -> Case:
    model, batch, loss = gpt2(B, T)
    return _nonzero_lora_b(_lora(model, ["c_attn", "c_proj"])), batch, loss


def lora_llama(B: int = 6, T: int = 7) -> Case:
    model, batch, loss = llama(B, T)
    return _nonzero_lora_b(_lora(model, ["q_proj", "v_proj"])), batch, loss


class EncoderClassifier(nn.Module):
    """torch's own TransformerEncoder over token embeddings, mean-pooled, a linear head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(V, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=FF, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(D, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids))
        return self.head(h.mean(dim=1 if self.batch_first else 0))


def torch_encoder(B: int = 6, T: int = 7, batch_first: bool = True) -> Case:
    torch.manual_seed(0)
    ids = _ids(B, T)
    if not batch_first:
        ids = ids.t().contiguous()  # (T, B)
    return EncoderClassifier(batch_first), (ids, _labels(B)), lambda m, b: F.cross_entropy(m(b[0]), b[1])


CASES: Dict[str, Callable[..., Case]] = {
    "gpt2": gpt2,
    "bert": bert,
    "roberta": roberta,
    "distilbert": distilbert,
    "llama": llama,
    "qwen2": qwen2,
    "mistral": mistral,
    "gemma": gemma,
    "t5": t5,
    "opt": opt,
    "hf_vit": hf_vit,
    "timm_vit": timm_vit,
    "timm_resnet": timm_resnet,
    "lora_gpt2": lora_gpt2,
    "lora_llama": lora_llama,
    "torch_encoder": torch_encoder,
    "gpt2_lm_tied": gpt2_lm,
    "llama_tied": llama_tied,
    "opt_tied": opt_tied,
    "t5_tied": t5_tied,
    "hf_vit_all": hf_vit_all,
    "timm_vit_all": timm_vit_all,
}
