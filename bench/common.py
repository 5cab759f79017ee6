"""Helpers shared by the benchmark scripts: timing, inputs, environment record, result files.

Timing (GPU): each repetition is bracketed by its own pair of CUDA events, the median is
reported. For kernel-level timings the L2 cache is flushed before every repetition by writing a
buffer larger than L2 (outside the events), so that repeated runs over one input do not measure
the cache; the flush also keeps the GPU busy while the CPU enqueues the next launch, so Python
launch overhead is hidden the way it is in a real step. CPU fallback (``--smoke``):
``time.perf_counter`` around each repetition.

Results: ``write_results`` writes ``<name>-<DEVICE>-<date>.md`` and ``.json`` into every
result folder: ``bench/results/`` (GPU runs only) and ``$OUT`` when set. A run on the CPU never
writes into ``bench/results/``: CPU timings are smoke tests, not results.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SMOKE_DIR = Path("/tmp/dpkernels-bench-smoke")

if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ on the path, not the repo root
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

GiB = 1024**3
MiB = 1024**2

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


# ------------------------------------------------------------------ device -----------------


def pick_device(smoke: bool) -> torch.device:
    if torch.cuda.is_available() and not smoke:
        return torch.device("cuda")
    if not smoke:
        raise SystemExit("no CUDA GPU here: the benchmarks need one (run with --smoke for a CPU check of the scripts)")
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_tag(device: torch.device) -> str:
    """Short device name for file names: 'H100', 'H200', 'A100', ... or 'CPU-smoke'."""
    if device.type != "cuda":
        return "CPU-smoke"
    name = torch.cuda.get_device_name(device)
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name.replace("NVIDIA", ""))
    tag = m.group(1) if m else name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tag).strip("-") or "GPU"


def today() -> str:
    return _dt.date.today().isoformat()


# ------------------------------------------------------------------ environment ------------


def _run(cmd: Sequence[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except Exception:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """HEAD of the checkout (+dirty when dpkernels/ or csrc/ differ from it). Where the tree was
    copied without .git (the device machine), ``DPKERNELS_COMMIT`` set by the caller is used."""
    commit = _run(["git", "rev-parse", "HEAD"])
    if commit is None:
        return os.environ.get("DPKERNELS_COMMIT", "unknown") + " (from $DPKERNELS_COMMIT)"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no", "--", "dpkernels", "csrc"])
    return commit + ("+dirty" if dirty else "")


def env_record(device: torch.device, **extra: Any) -> Dict[str, Any]:
    """What produced a results file: device, date, versions, commit, the knobs that change speed."""
    rec: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": "cpu",
        "device_tag": device_tag(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "dpkernels_commit": git_commit(),
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "DPKERNELS_BACKEND": os.environ.get("DPKERNELS_BACKEND"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    try:
        import triton

        rec["triton"] = triton.__version__
    except Exception:
        rec["triton"] = None
    try:
        import opacus

        rec["opacus"] = opacus.__version__
    except Exception:
        rec["opacus"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec["device"] = torch.cuda.get_device_name(device)
        rec["sm_count"] = props.multi_processor_count
        rec["gpu_memory_GiB"] = round(props.total_memory / GiB, 1)
        rec["compute_capability"] = f"{props.major}.{props.minor}"
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        rec["driver"] = smi.splitlines()[0] if smi else None
    else:
        rec["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    # (functional.backends() is not called: it would JIT-build the CUDA extension, which these
    # benchmarks do not use; the backend each row ran on is recorded with the row)
    rec.update(extra)
    return rec


def env_markdown(env: Dict[str, Any]) -> str:
    keys = [
        "date",
        "device",
        "driver",
        "cuda_runtime",
        "torch",
        "triton",
        "opacus",
        "python",
        "dpkernels_commit",
        "allow_tf32_matmul",
        "TRITON_INTERPRET",
        "command",
    ]
    lines = [f"- {k}: `{env.get(k)}`" for k in keys if k in env]
    lines += [f"- {k}: `{v}`" for k, v in env.items() if k not in keys and not isinstance(v, (dict, list))]
    return "\n".join(lines)


# ------------------------------------------------------------------ inputs -----------------


def randn(
    shape: Sequence[int], *, dtype: torch.dtype, device: torch.device, gen: torch.Generator, scale: float = 1.0
) -> torch.Tensor:
    """Standard normal values (never all zero: timing on zeros flatters and hides bugs)."""
    t = torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(dtype)


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ------------------------------------------------------------------ timing -----------------

_FLUSH: Dict[str, torch.Tensor] = {}


def l2_flush_buffer(device: torch.device) -> Optional[torch.Tensor]:
    """A buffer of 4x the L2 size (at least 256 MiB); writing it evicts the L2."""
    if device.type != "cuda":
        return None
    key = str(device)
    if key not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * MiB) or 64 * MiB
        _FLUSH[key] = torch.empty(max(256 * MiB, 4 * l2), dtype=torch.int8, device=device)
    return _FLUSH[key]


class Timing(dict):
    """{'median_ms', 'min_ms', 'max_ms', 'reps', 'warmup'} with attribute access to the median."""

    @property
    def ms(self) -> float:
        return self["median_ms"]


def _summary(times: List[float], warmup: int) -> Timing:
    return Timing(
        median_ms=statistics.median(times),
        min_ms=min(times),
        max_ms=max(times),
        reps=len(times),
        warmup=warmup,
    )


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 5,
    reps: Optional[int] = None,
    min_reps: int = 10,
    max_reps: int = 200,
    target_ms: float = 150.0,
    flush_l2: bool = True,
    on_warm: Optional[Callable[[], Any]] = None,
) -> Timing:
    """Median time of ``fn()`` in ms over repetitions, each timed on its own.

    ``reps=None``: as many repetitions as fit in about ``target_ms`` of measured time,
    between ``min_reps`` and ``max_reps`` (estimated from the warm-up). ``on_warm()`` runs
    once between the warm-up and the timed repetitions.
    """
    flush = l2_flush_buffer(device) if flush_l2 else None
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        fn()
    sync(device)
    est_ms = (time.perf_counter() - t0) * 1e3 / max(1, warmup)
    if on_warm is not None:  # e.g. reset the peak-memory counter: steady state only
        on_warm()
    if reps is None:
        reps = int(min(max_reps, max(min_reps, math.ceil(target_ms / max(est_ms, 1e-3)))))
    times: List[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return _summary(times, warmup)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak memory allocated by one ``fn()`` call beyond what was allocated before it (the
    inputs, the model, ...); None on the CPU. The result of ``fn`` is dropped after the peak is
    read, so it counts (an output is memory the op needs)."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return int(peak - base)


def free_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    # memory the caching allocator holds but does not use can be handed out too
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    if isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


class Budget:
    """Wall-clock budget of one script: configurations past it are skipped with a reason."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds


# ------------------------------------------------------------------ formatting / files -----


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "–"
    if abs(b) >= GiB:
        return f"{b / GiB:.2f} GiB"
    if abs(b) >= MiB:
        return f"{b / MiB:.1f} MiB"
    if abs(b) >= 1024:
        return f"{b / 1024:.1f} KiB"
    return f"{int(b)} B"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c) for c in r) + " |")
    return "\n".join(lines)


def result_dirs(device: torch.device, out_dir: Optional[str], cpu_results: bool = False) -> List[Path]:
    """Where result files go: an explicit --out-dir; else bench/results/ (GPU, or a CPU run a script
    declares a CPU measurement with ``cpu_results``; its files are named -CPU-) or the smoke folder in
    /tmp (CPU); plus $OUT when set (the device machine's return folder)."""
    dirs: List[Path] = []
    if out_dir:
        dirs.append(Path(out_dir))
    elif device.type == "cuda" or cpu_results:
        dirs.append(RESULTS)
    else:
        dirs.append(SMOKE_DIR)
    if os.environ.get("OUT") and device.type == "cuda":
        dirs.append(Path(os.environ["OUT"]))
    for d in dirs:
        if device.type != "cuda" and not cpu_results and d.resolve() == RESULTS.resolve():
            raise SystemExit("refusing to write CPU timings into bench/results/ (they are not results)")
        d.mkdir(parents=True, exist_ok=True)
    seen, unique = set(), []
    for d in dirs:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            unique.append(d)
    return unique


def write_results(
    name: str,
    device: torch.device,
    env: Dict[str, Any],
    payload: Dict[str, Any],
    markdown: str,
    out_dir: Optional[str] = None,
    cpu_results: bool = False,
) -> List[Path]:
    """Write ``<name>-<DEVICE>-<date>.md`` / ``.json`` (environment first) into every result folder."""
    stem = f"{name}-{env.get('device_tag', device_tag(device))}-{today()}"
    doc = {"environment": env, **payload}
    md = f"# {name} — {env.get('device')} — {env.get('date')}\n\n## Environment\n\n{env_markdown(env)}\n\n{markdown}\n"
    written = []
    for d in result_dirs(device, out_dir, cpu_results):
        (d / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (d / f"{stem}.md").write_text(md)
        written += [d / f"{stem}.md", d / f"{stem}.json"]
    return written


def add_common_args(parser) -> None:
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes, few repetitions, CPU; writes to /tmp only (checks the script runs)",
    )
    parser.add_argument("--out-dir", default=None, help="write the result files here instead of bench/results/")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="skip the configurations that would start after this many seconds"
    )
    parser.add_argument("--seed", type=int, default=0)


def smoke_dp_backend() -> str:
    """dpkernels backend for CPU smoke runs: the Triton kernels under the interpreter if enabled."""
    return "triton" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "torch"
