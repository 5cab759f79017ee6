"""Named ranges of the engine's phases for torch.profiler (``bench/bench_cpu.py --profile``).

``phase("dpkernels.norms")`` is a ``record_function`` range while a profiler runs and a no-op
otherwise, so that the step pays nothing for it outside profiling.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

_NULL = contextlib.nullcontext()


def phase(name: str) -> ContextManager:
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.autograd.profiler.record_function(name)
    return _NULL
