"""Named phases of the private step, for measuring where its time goes (``bench/bench_cpu.py``).

``phase("dpkernels.norms")`` marks a block of the engine: per-example norms (in backward), clip
factors, clipped sums, noise (inside the clipped sums). Outside a measurement it is a shared
no-op context (one attribute check), so the step pays nothing for it. Two ways to measure:

- ``with timing() as seconds: ...``: wall-clock seconds spent in each phase while the block runs,
  by ``time.perf_counter`` around each marked block (a nested phase counts in its parent too);
  exact on any number of threads.
- torch.profiler: each phase is then a ``record_function`` range in the trace.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import ContextManager, Dict, Iterator, Optional

import torch

_NULL = contextlib.nullcontext()
_seconds: Optional[Dict[str, float]] = None


class _Timed:
    __slots__ = ("name", "start")

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if _seconds is not None:
            _seconds[self.name] += time.perf_counter() - self.start


def phase(name: str) -> ContextManager:
    if _seconds is not None:
        return _Timed(name)
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.autograd.profiler.record_function(name)
    return _NULL


@contextlib.contextmanager
def timing() -> Iterator[Dict[str, float]]:
    """Seconds per phase name spent while the block runs (not re-entrant)."""
    global _seconds
    if _seconds is not None:
        raise RuntimeError("dpkernels phase timing is already running")
    _seconds = defaultdict(float)
    try:
        yield _seconds
    finally:
        _seconds = None
