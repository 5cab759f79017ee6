"""Loader of the CUDA extension (``csrc/``) and Python wrappers of its kernels.

The extension is, in order of preference,

1. ``dpkernels._C``, prebuilt by ``pip install --no-build-isolation -e .`` (setup.py builds it
   when the build environment's torch is a CUDA build and nvcc is found), or
2. JIT-compiled from ``<repo root>/csrc`` with ``torch.utils.cpp_extension.load`` (module name
   ``dpkernels_C``, cached by torch under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``).

Nothing happens at import: the first call of :func:`load`, :func:`available`,
:func:`why_unavailable` or of a kernel wrapper does the work (a JIT compile takes a minute or so,
once per machine), and its outcome, the module or the reason it is unavailable, is cached for the
life of the process.

Set ``DPKERNELS_DISABLE_CUDA=1`` to make the extension unavailable (to exercise the fallbacks),
``DPKERNELS_VERBOSE_BUILD=1`` to see the JIT compiler's output.

API
---
``available() -> bool``, ``why_unavailable() -> str | None``, ``load() -> module`` (raises
RuntimeError with the reason), ``attempted() -> bool``, ``csrc_dir() -> Path``, and the kernels:

``clip_sum_noise(per_example, clip_factors, noise_std, key) -> Tensor``
    ``sum_i clip_factors[i] * per_example[i] + noise_std * N(0, I)`` with the Philox noise of
    ``dpkernels.ops.philox`` (element j of the flattened parameter is slot j & 1 of counter
    (j >> 1, step, stream)).
``philox_normal(numel, key, device="cuda", offset=0) -> Tensor``
    float32 standard normals for elements ``offset .. offset + numel - 1`` of ``key``'s block.
``philox4x32(numel, key, device="cuda", offset=0) -> Tensor``
    int64 ``(numel, 4)``: the four Philox-4x32-10 output words (as unsigned 32-bit values) of the raw
    counters ``offset + j`` (the cipher alone, for tests; not element indices).
"""

from __future__ import annotations

import importlib
import math
import os
import threading
import zlib
from pathlib import Path
from types import ModuleType
from typing import Optional, Union

import torch

from dpkernels.ops.philox import MASK32, PhiloxKey, resolve_key

__all__ = [
    "available",
    "why_unavailable",
    "load",
    "attempted",
    "csrc_dir",
    "clip_sum_noise",
    "philox_normal",
    "philox4x32",
]

_SOURCES = ("bindings.cpp", "clip_sum_noise.cu")
_HEADERS = ("clip_sum_noise.h", "clip_sum_noise_impl.cuh", "philox.cuh")
_REQUIRED_FUNCTIONS = ("clip_sum_noise", "philox_normal", "philox4x32")
_JIT_NAME = "dpkernels_C"
_JIT_CFLAGS = ["-O3"]
# No --use_fast_math: it buys nothing in these memory-bound kernels and flushes subnormal
# gradients to zero. (The noise itself is flag-independent, see csrc/philox.cuh.)
_JIT_CUDA_CFLAGS = ["-O3", "-lineinfo"]
_MAX_REASON_CHARS = 4000

_lock = threading.Lock()
_attempted = False
_module: Optional[ModuleType] = None
_reason: Optional[str] = None


class _Unavailable(Exception):
    pass


def csrc_dir() -> Path:
    """Where the C++/CUDA sources are looked for: the copy an installed wheel carries
    (``dpkernels/_csrc``, see setup.py), else ``csrc/`` next to the package (a checkout)."""
    bundled = Path(__file__).resolve().parent / "_csrc"
    return bundled if bundled.is_dir() else Path(__file__).resolve().parent.parent / "csrc"


def _tail(text: str) -> str:
    text = text.strip()
    if len(text) > _MAX_REASON_CHARS:
        text = "...\n" + text[-_MAX_REASON_CHARS:]
    return text


def _environment_reason() -> Optional[str]:
    flag = os.environ.get("DPKERNELS_DISABLE_CUDA", "")
    if flag not in ("", "0"):
        return f"the CUDA extension is disabled by DPKERNELS_DISABLE_CUDA={flag}"
    if torch.version.cuda is None:
        if getattr(torch.version, "hip", None):
            return f"torch {torch.__version__} is a ROCm build; the extension needs a CUDA build of torch"
        return (
            f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); "
            "the CUDA kernels need a CUDA build of torch and a GPU"
        )
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def _import_prebuilt() -> tuple[Optional[ModuleType], Optional[str]]:
    """(module, None), or (None, why the prebuilt dpkernels._C is unusable; None if absent)."""
    try:
        mod = importlib.import_module("dpkernels._C")
    except ModuleNotFoundError as e:
        if e.name == "dpkernels._C":
            return None, None
        return None, f"importing the prebuilt dpkernels._C failed: {type(e).__name__}: {e}"
    except Exception as e:  # ImportError (undefined symbol: built against another torch), ...
        return None, f"importing the prebuilt dpkernels._C failed: {type(e).__name__}: {e}"
    missing = [f for f in _REQUIRED_FUNCTIONS if not hasattr(mod, f)]
    if missing:
        return None, f"the prebuilt dpkernels._C is stale (lacks {', '.join(missing)}); rebuild it"
    return mod, None


def _jit_compile() -> ModuleType:
    src = csrc_dir()
    missing = [f for f in _SOURCES + _HEADERS if not (src / f).is_file()]
    if missing:
        raise _Unavailable(
            f"the CUDA sources are not at {src} (missing {', '.join(missing)}): this installation of "
            "dpkernels carries no csrc/ and no prebuilt dpkernels._C was built; reinstall from a checkout "
            "(`pip install .` bundles the sources, `pip install --no-build-isolation -e .` builds the extension)"
        )
    from torch.utils import cpp_extension  # imported lazily: it is heavy and only needed here

    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None:
        raise _Unavailable("no CUDA toolkit to JIT-compile csrc/ with: nvcc is not on PATH and CUDA_HOME is not set")
    nvcc = Path(cuda_home) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
    if not nvcc.exists():
        raise _Unavailable(f"no nvcc at {nvcc} (CUDA_HOME={cuda_home}) to JIT-compile csrc/ with")
    # A checksum of every source and header as a define: torch rebuilds a JIT extension when its
    # sources or flags change, and this makes a header-only change count too.
    digest = 0
    for f in _SOURCES + _HEADERS:
        digest = zlib.crc32((src / f).read_bytes(), digest)
    tag = f"-DDPKERNELS_CSRC_CRC=0x{digest:08x}"
    try:
        mod = cpp_extension.load(
            name=_JIT_NAME,
            sources=[str(src / f) for f in _SOURCES],
            extra_include_paths=[str(src)],
            extra_cflags=[*_JIT_CFLAGS, tag],
            extra_cuda_cflags=[*_JIT_CUDA_CFLAGS, tag],
            verbose=os.environ.get("DPKERNELS_VERBOSE_BUILD", "") not in ("", "0"),
        )
    except Exception as e:
        raise _Unavailable(
            f"JIT compilation of {src} failed ({type(e).__name__}); set DPKERNELS_VERBOSE_BUILD=1 "
            f"for the full compiler output:\n{_tail(str(e))}"
        ) from e
    missing_fns = [f for f in _REQUIRED_FUNCTIONS if not hasattr(mod, f)]
    if missing_fns:
        raise _Unavailable(f"the JIT-compiled {_JIT_NAME} lacks {', '.join(missing_fns)}")
    return mod


def _load_uncached() -> ModuleType:
    reason = _environment_reason()
    if reason is not None:
        raise _Unavailable(reason)
    mod, prebuilt_problem = _import_prebuilt()
    if mod is not None:
        return mod
    try:
        return _jit_compile()
    except _Unavailable as e:
        if prebuilt_problem is not None:
            raise _Unavailable(f"{prebuilt_problem}; and then: {e}") from e
        raise


def _ensure_loaded() -> None:
    global _attempted, _module, _reason
    if _attempted:
        return
    with _lock:
        if _attempted:
            return
        try:
            _module = _load_uncached()
            _reason = None
        except _Unavailable as e:
            _module, _reason = None, str(e)
        except Exception as e:  # never let a loader bug escape as anything but "unavailable"
            _module, _reason = None, f"loading the CUDA extension failed: {type(e).__name__}: {e}"
        _attempted = True


def load() -> ModuleType:
    """The extension module; raises RuntimeError saying why when it cannot be had.

    First call: imports ``dpkernels._C`` or JIT-compiles ``csrc/`` (see the module docstring).
    The outcome is cached: later calls return at once (or raise the same error).
    """
    _ensure_loaded()
    if _module is None:
        raise RuntimeError(f"dpkernels CUDA extension unavailable: {_reason}")
    return _module


def available() -> bool:
    """Whether the CUDA kernels can run here (loads, possibly JIT-compiles, on the first call)."""
    _ensure_loaded()
    return _module is not None


def why_unavailable() -> Optional[str]:
    """None when :func:`available`, else the reason (loads on the first call, like available())."""
    _ensure_loaded()
    return _reason


def attempted() -> bool:
    """Whether loading has been tried yet in this process (importing this module never does)."""
    return _attempted


def _reset() -> None:
    """Forget the cached outcome (tests only)."""
    global _attempted, _module, _reason
    with _lock:
        _attempted, _module, _reason = False, None, None


def _split_key(key: Union[PhiloxKey, torch.Generator, None]) -> tuple[int, int, int, int]:
    k = resolve_key(key)
    return k.seed_lo, k.seed_hi, k.step, k.stream


def _offset_bits(offset: int) -> int:
    offset = int(offset)
    if not 0 <= offset < 2**64:
        raise ValueError(f"offset must be in [0, 2**64), got {offset}")
    return offset - 2**64 if offset >= 2**63 else offset  # the extension reads int64 bits as uint64


def clip_sum_noise(
    per_example: torch.Tensor,
    clip_factors: torch.Tensor,
    noise_std: float,
    key: Union[PhiloxKey, torch.Generator, None],
) -> torch.Tensor:
    """Fused ``sum_i clip_factors[i] * per_example[i] + noise_std * z`` on the GPU.

    per_example: ``(B, *shape)`` float32 / bfloat16 / float16 CUDA tensor (made contiguous if it
    is not). clip_factors: ``(B,)`` on the same device (cast to float32). noise_std: float >= 0
    (0 skips the noise). key: the counter block of the noise, a
    :class:`dpkernels.ops.philox.PhiloxKey` (a ``torch.Generator`` or None draws a fresh key, as
    ``resolve_key`` does). Returns ``shape`` in per_example's dtype; accumulation is float32.
    The noise for flat element j equals ``noise_std * dpkernels.ops.philox.philox_normal(n, key)[j]``.
    """
    mod = load()
    if not isinstance(per_example, torch.Tensor) or per_example.dim() < 1:
        raise ValueError("per_example must be a tensor of shape (B, *param_shape)")
    if not isinstance(clip_factors, torch.Tensor):
        raise TypeError(f"clip_factors must be a tensor, got {type(clip_factors).__name__}")
    batch = per_example.shape[0]
    shape = per_example.shape[1:]
    n = math.prod(shape)
    g = per_example.reshape(batch, n)
    if not g.is_contiguous():
        g = g.contiguous()
    c = clip_factors
    if c.is_floating_point() and c.dtype != torch.float32:
        c = c.to(torch.float32)
    if not c.is_contiguous():
        c = c.contiguous()
    seed_lo, seed_hi, step, stream = _split_key(key)
    out = mod.clip_sum_noise(g, c, float(noise_std), seed_lo, seed_hi, step, stream)
    return out.reshape(shape)


def philox_normal(
    numel: int,
    key: Union[PhiloxKey, torch.Generator, None],
    device: Union[torch.device, str] = "cuda",
    offset: int = 0,
) -> torch.Tensor:
    """float32 ``(numel,)`` standard normals for elements ``offset + j`` of ``key``'s block (GPU).

    With offset 0 this equals ``dpkernels.ops.philox.philox_normal(numel, key)`` up to float32
    rounding of log/cos (integers identical).
    """
    mod = load()
    seed_lo, seed_hi, step, stream = _split_key(key)
    return mod.philox_normal(int(numel), seed_lo, seed_hi, step, stream, torch.device(device), _offset_bits(offset))


def philox4x32(
    numel: int,
    key: Union[PhiloxKey, torch.Generator, None],
    device: Union[torch.device, str] = "cuda",
    offset: int = 0,
) -> torch.Tensor:
    """int64 ``(numel, 4)``: the Philox-4x32-10 words (x0, x1, x2, x3) at raw counters ``offset + j``."""
    mod = load()
    seed_lo, seed_hi, step, stream = _split_key(key)
    raw = mod.philox4x32(int(numel), seed_lo, seed_hi, step, stream, torch.device(device), _offset_bits(offset))
    return raw.to(torch.int64) & MASK32
