"""Loader of dpkernels' compiled CPU kernels (``csrc/cpu_kernels.h``).

Two torch reference paths are slow on a CPU for what they do: the Philox noise
(``dpkernels/ops/philox.py``, ~120 int64 tensor operations per parameter tensor: most of a small
model's private step) and the convolution patch matrices (``dpkernels/ops/conv_patches.py``, a
7-d strided copy). The same results, compiled, are one call each:

    csrc/philox_cpu.cpp   the noise, AVX-512 / AVX2 / scalar, the CUDA header's normals
    csrc/patches_cpu.cpp  the (g, B, L, d) patch matrices, exactly input_patches' values
    csrc/cpu_bindings.cpp the module

They are JIT-compiled with torch's extension tooling (``torch.utils.cpp_extension.load``: the
machine's C++ compiler and ninja) the first time the torch backend needs one on a CPU, once per
machine (cached by torch under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), and
used from then on. Without a compiler, or with ``DPKERNELS_DISABLE_CPU_KERNEL=1``, the
references run instead (the same noise to a float32 ulp, the same patches exactly);
``dpkernels.backends()["cpu"]`` says which and why. ``DPKERNELS_VERBOSE_BUILD=1`` shows the
compiler.

API: ``available() -> bool``, ``why_unavailable() -> str | None``, ``load() -> module`` (raises
RuntimeError with the reason), and the kernels ``philox_normal(numel, key, offset=0)``,
``add_normal_(out, std, key)``, ``philox4x32(numel, key, offset=0)``, ``conv_patches(...)``,
and ``isa()``, the vector path of the noise in use (avx512, avx2 or scalar).
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from .ops.philox import PhiloxKey

_JIT_NAME = "dpkernels_cpu"
SOURCES = ("philox_cpu.cpp", "patches_cpu.cpp", "cpu_bindings.cpp")
_lock = threading.Lock()
_attempted = False
_module: Optional[ModuleType] = None
_reason: Optional[str] = None


def csrc_dir() -> Path:
    from ._cuda import csrc_dir as sources  # one rule: the wheel's bundled copy, else the checkout's csrc/

    return sources()


def _build() -> ModuleType:
    if os.environ.get("DPKERNELS_DISABLE_CPU_KERNEL") == "1":
        raise RuntimeError("disabled by DPKERNELS_DISABLE_CPU_KERNEL=1")
    sources = [csrc_dir() / name for name in SOURCES]
    missing = [str(src) for src in sources if not src.is_file()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found (an installation without the C++ sources)")
    from torch.utils import cpp_extension

    verbose = os.environ.get("DPKERNELS_VERBOSE_BUILD") == "1"
    build_dir = Path(cpp_extension._get_build_directory(_JIT_NAME, verbose))
    if not any(build_dir.glob(f"{_JIT_NAME}*.so")):
        print("dpkernels: compiling the CPU kernels (csrc/*_cpu.cpp), once per machine...", file=sys.stderr, flush=True)
    cflags, ldflags = ["-O3", "-ffp-contract=off", "-Wno-psabi"], []
    if _openmp_backend():  # at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    if _libmvec():  # the vector (AVX2 / AVX-512) paths need glibc's vector math library
        cflags.append("-DDPK_HAVE_LIBMVEC")
        ldflags.append("-lmvec")
    return cpp_extension.load(
        name=_JIT_NAME,
        sources=[str(src) for src in sources],
        extra_include_paths=[str(csrc_dir())],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        verbose=verbose,
    )


def _openmp_backend() -> bool:
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _libmvec() -> bool:
    """x86-64 Linux with glibc's libmvec (its vector ln/sin/cos, the ABI the vector paths call)."""
    if platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"):
        return False
    return ctypes.util.find_library("mvec") is not None


def load() -> ModuleType:
    global _attempted, _module, _reason
    if _module is not None:  # built: no lock on the path every noise draw takes
        return _module
    with _lock:
        if not _attempted:
            _attempted = True
            try:
                _module = _build()
            except Exception as e:  # no compiler, no ninja, a failed build: the references run instead
                _reason = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    if _module is None:
        raise RuntimeError(f"the compiled CPU kernels are unavailable: {_reason}")
    return _module


def available() -> bool:
    try:
        load()
    except RuntimeError:
        return False
    return True


def why_unavailable() -> Optional[str]:
    return None if available() else _reason


def philox_normal(numel: int, key: PhiloxKey, offset: int = 0) -> torch.Tensor:
    return load().philox_normal(int(numel), key.seed_lo, key.seed_hi, key.step, key.stream, int(offset))


def add_normal_(out: torch.Tensor, std: float, key: PhiloxKey) -> torch.Tensor:
    load().add_normal_(out, float(std), key.seed_lo, key.seed_hi, key.step, key.stream)
    return out


def isa() -> str:
    """The path drawing the normals here: ``avx512``, ``avx2`` or ``scalar`` (csrc/philox_cpu.cpp)."""
    return load().isa()


def set_isa(name: str) -> str:
    """Use the ``name`` path where this CPU runs it (tests compare the paths); returns the path in use."""
    return load().set_isa(name)


def philox4x32(numel: int, key: PhiloxKey, offset: int = 0) -> torch.Tensor:
    return load().philox4x32(int(numel), key.seed_lo, key.seed_hi, key.step, key.stream, int(offset))


def conv_patches(
    x: torch.Tensor, groups: int, kernel: tuple, stride: tuple, pad_top_left: tuple, dilation: tuple, out_size: tuple
) -> torch.Tensor:
    """(g, B, L, d) patches of x (B, C, H, W) with zero padding (see csrc/patches_cpu.cpp)."""
    return load().conv_patches(
        x,
        int(groups),
        *map(int, kernel),
        *map(int, stride),
        *map(int, pad_top_left),
        *map(int, dilation),
        *map(int, out_size),
    )
