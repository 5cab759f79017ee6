"""Which implementation of a kernel runs: the one place where a backend is chosen.

Backends
--------
``torch``   reference implementations in plain torch ops (any device; stores Gram matrices or
            per-example gradients, so it is the slow path, meant for CPUs and checking).
``triton``  the fused Triton kernels (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1).
``cuda``    the CUDA kernels of csrc/ for the ops that have one (``clip_sum_noise``); ops without
            a CUDA kernel run their Triton kernel under this choice.

The choice, in order: the ``backend=`` argument, else the ``DPKERNELS_BACKEND`` environment
variable, else automatic: triton for CUDA tensors when triton is installed, torch otherwise.
An explicit choice that cannot run here raises an error naming the reason; it never falls back
silently. ``backends()`` reports what is available.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _cuda
from ._triton import HAS_TRITON, interpret_mode

BACKENDS = ("torch", "triton", "cuda")


def backends(load_cuda: bool = True, load_cpu: bool = True) -> dict:
    """Which backends can run here, and why not where they cannot.

    ``load_cuda=False`` does not load the CUDA extension if nothing has yet (on a GPU machine
    without a prebuilt one, loading JIT-compiles csrc/, about a minute): its entry then says so.
    ``cpu`` is the compiled CPU kernels the torch backend uses on CPU tensors (the Philox noise
    and the convolution patches, ``dpkernels._cpu``; JIT-compiled at first use, ``load_cpu=False``
    does not compile them); without them the torch reference computes the same, slower.
    """
    triton_ok = HAS_TRITON and (torch.cuda.is_available() or interpret_mode())
    if not HAS_TRITON:
        triton_why = "triton is not installed"
    elif not triton_ok:
        triton_why = "no CUDA GPU (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"
    else:
        triton_why = None
    if not load_cuda and not _cuda.attempted():
        cuda = {"available": None, "reason": "not loaded yet (backends(load_cuda=True) loads or JIT-compiles it)"}
    else:
        cuda = {"available": _cuda.available(), "reason": _cuda.why_unavailable()}
    from .. import _cpu

    if not load_cpu and not _cpu._attempted:
        cpu = {"available": None, "reason": "not compiled yet (backends(load_cpu=True) or the first CPU noise does it)"}
    else:
        cpu = {"available": _cpu.available(), "reason": _cpu.why_unavailable()}
    return {
        "torch": {"available": True, "reason": None},
        "triton": {"available": triton_ok, "reason": triton_why},
        "cuda": cuda,
        "cpu": cpu,
    }


def select_backend(device: torch.device, backend: Optional[str] = None, *, op_has_cuda: bool = False) -> str:
    """Resolve ``backend`` (argument, env, auto) to the implementation that will run on ``device``.

    Returns "torch", "triton" or "cuda". Raises ValueError for an unknown name and RuntimeError
    when the requested backend cannot run on this device.
    """
    choice = backend if backend is not None else os.environ.get("DPKERNELS_BACKEND", "auto")
    choice = choice.lower()
    if choice not in BACKENDS + ("auto",):
        raise ValueError(f"unknown dpkernels backend {choice!r}; choose one of {BACKENDS} or 'auto'")
    on_gpu = device.type == "cuda"
    if choice == "auto":
        return "triton" if (on_gpu and HAS_TRITON) else "torch"
    if choice == "torch":
        return "torch"
    if choice == "cuda":
        if not on_gpu:
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if op_has_cuda:
            if not _cuda.available():
                raise RuntimeError(f"backend 'cuda' is unavailable: {_cuda.why_unavailable()}")
            return "cuda"
        choice = "triton"  # documented: ops without a CUDA kernel use their Triton kernel
    if not HAS_TRITON:
        raise RuntimeError("backend 'triton' requested but triton is not installed (pip install triton)")
    if not on_gpu and not interpret_mode():
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run the "
            "Triton kernels on the CPU"
        )
    return "triton"
