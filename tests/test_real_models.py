"""Real models as their libraries build them: accepted as they are, and exact.

Tiny random-init configs (no downloads, ``tests/real_models.py``) of Hugging Face transformers,
timm, peft and torch's own TransformerEncoder. For each, ``dpkernels.verify`` compares the
noise-free private step with a float64 per-example loop: every trainable parameter within 1e-5
relative error in float32, with the clip norm at the median per-example norm so that at least
half of the examples are clipped. The tied and all-trainable cases train every parameter;
``test_guard.py`` has the cases the guard must refuse, ``test_tied.py`` and ``test_fallback.py``
the ties and the fallback on their own.
"""

from __future__ import annotations

import pytest

import dpkernels

import real_models
from timm_import import import_timm

LIBRARY = {
    "timm_vit": "timm",
    "timm_vit_all": "timm",
    "timm_resnet": "timm",
    "lora_gpt2": "peft",
    "lora_llama": "peft",
    "torch_encoder": None,
}


@pytest.mark.parametrize("name", list(real_models.CASES))
def test_private_step_equals_the_per_example_loop(name):
    library = LIBRARY.get(name, "transformers")
    if library == "timm":
        try:
            import_timm()
        except ImportError as e:
            pytest.skip(f"timm: {e}")
    elif library is not None:
        pytest.importorskip(library)
    model, batch, loss = real_models.CASES[name]()
    report = dpkernels.verify(model, loss, batch)
    assert report.ok, str(report)
    assert report.max_rel_err <= 1e-5
    assert report.clipped_fraction >= 0.5, str(report)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {c.name for c in report.parameters} == trainable  # every trainable parameter was checked


def test_converted_layers_keep_their_library_classes_and_state_dict():
    """The integrations turn library layers into their DP versions in place: same object, same class
    (isinstance), same state_dict keys."""
    pytest.importorskip("transformers")
    import copy

    model, _, _ = real_models.llama()
    keys = list(model.state_dict())
    norm_cls = type(model.model.norm)
    converted = dpkernels.nn.convert(copy.deepcopy(model))
    assert list(converted.state_dict()) == keys
    assert isinstance(converted.model.norm, norm_cls) and isinstance(converted.model.norm, dpkernels.nn.DPModule)
    gpt, _, _ = real_models.gpt2()
    from transformers.pytorch_utils import Conv1D

    conv = dpkernels.nn.convert(gpt).transformer.h[0].attn.c_attn
    assert isinstance(conv, Conv1D) and isinstance(conv, dpkernels.nn.DPModule)
