"""Test configuration: where the Triton kernels run, and which devices the tests cover.

Without a CUDA GPU the Triton kernels run on CPU tensors in the Triton interpreter, which
reads TRITON_INTERPRET when triton is imported: it is set here, before anything imports
triton (torch alone does not). On a GPU machine the same tests also run with CUDA tensors.
Tests marked ``gpu`` are skipped where there is no CUDA GPU.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        warnings.warn("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1", stacklevel=1)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if torch.cuda.is_available():
    # one fixed tiling per kernel variant: autotuning every odd test shape would compile for
    # minutes; the gpu-marked autotune tests switch it back on
    os.environ.setdefault("DPKERNELS_AUTOTUNE", "0")
    # float32 convolutions exactly (torch's default lets cuDNN use TF32): the conv clipped sum is
    # torch's conv backward and follows this setting, and the tests check float32 to float32 rounding
    torch.backends.cudnn.allow_tf32 = False

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
BACKENDS = ["torch", "triton"]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the GPU machine)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def triton_runnable(device: torch.device) -> bool:
    """Whether the Triton backend can run on tensors of ``device`` in this process."""
    from dpkernels.ops._triton import HAS_TRITON, interpret_mode

    if not HAS_TRITON:
        return False
    return device.type == "cuda" or interpret_mode()


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=BACKENDS)
def backend(request, device) -> str:
    """Backend under test, skipped where it cannot run on ``device`` (Triton on CPU outside the interpreter)."""
    if request.param == "triton" and not triton_runnable(device):
        pytest.skip("Triton cannot run on CPU tensors without TRITON_INTERPRET=1")
    return request.param
