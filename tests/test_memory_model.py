"""bench/memory_model.py: its byte counting, its smoke run, and (GPU) its prediction against
torch.cuda.max_memory_allocated."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

pytest.importorskip("triton")  # the dpkernels mode runs the Triton backend's (fake) kernels

from bench import bench_step, memory_model, models  # noqa: E402


def test_live_bytes_counts_storages_once_rounded_and_frees_them():
    tracker = memory_model.LiveBytes()
    with tracker:
        a = torch.empty(1000, device="meta")  # 4000 B -> 4096 B (512-byte blocks)
        view = a[10:20]
        assert tracker.live == 4096
        b = torch.empty(3, 128, device="meta")  # 1536 B, already a multiple of 512
        assert tracker.live == 4096 + 1536
        del a
        assert tracker.live == 4096 + 1536  # the view keeps the storage alive
        del view
        assert tracker.live == 1536
        c = b + 1
        assert tracker.live == 2 * 1536
        del b, c
    assert tracker.live == 0
    assert tracker.peak == 4096 + 1536


def test_live_bytes_sees_backward_and_adopted_tensors():
    tracker = memory_model.LiveBytes()
    w = torch.empty(256, 128, device="meta", requires_grad=True)  # made outside the mode
    tracker.adopt(w)
    assert tracker.live == 256 * 128 * 4
    with tracker:
        x = torch.empty(64, 256, device="meta")
        (x @ w).sum().backward()
    assert w.grad is not None
    assert tracker.live == 2 * 256 * 128 * 4 + 64 * 256 * 4  # w, w.grad, x


def test_gpu_like_execution_patches_only_sdpa_and_restores_it():
    """No monkeypatch of Triton's launcher: dpkernels' kernels run their fake implementations on meta."""
    import triton.runtime.jit as jit

    launch, sdpa = jit.KernelInterface.__getitem__, F.scaled_dot_product_attention
    interpret = os.environ.get("TRITON_INTERPRET")
    with memory_model.gpu_like_execution():
        assert F.scaled_dot_product_attention is not sdpa
        assert jit.KernelInterface.__getitem__ is launch and os.environ.get("TRITON_INTERPRET") == interpret
        q = torch.empty(2, 3, 40, 8, device="meta")
        assert F.scaled_dot_product_attention(q, q, q, is_causal=True).shape == q.shape
    assert F.scaled_dot_product_attention is sdpa


def test_dpkernels_ops_count_their_outputs_on_meta():
    """A dpkernels op on meta tensors runs its fake implementation under the byte counter: its output is
    counted, no kernel is launched (a Triton launch on meta tensors would fail)."""
    from dpkernels import functional

    tracker = memory_model.LiveBytes()
    x, g = torch.empty(8, 16, 64, device="meta"), torch.empty(8, 16, 96, device="meta")
    with tracker:
        w, b = functional.linear_clipped_grad(x, g, torch.ones(8, device="meta"), noise_std=1.0, backend="triton")
    assert w.shape == (96, 64) and b.shape == (96,)
    assert tracker.live >= 96 * 64 * 4 + 512


def _args(**kw) -> argparse.Namespace:
    base = dict(
        optimizer="sgd", norm_method="auto", timeline=False, modes=["non_private", "dpkernels"], dtype=["float32"]
    )
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("workload", ["gpt", "stack_T1", "stack_T256"])
def test_meta_step_runs_and_dpkernels_keeps_nothing_between_steps(workload):
    kind, cfg = bench_step.SMOKE_WORKLOADS[workload]
    from dpkernels.ops import _tiles

    _tiles._PAIRS_CACHE.clear()  # the ghost kernel's cached tile-pair list (a few bytes) stays resident
    rows = {m: memory_model.measure(kind, cfg, m, "float32", _args()) for m in ("non_private", "dpkernels")}
    for r in rows.values():
        assert r["status"] == "ok", r
    # after step() the engine has freed every (x, G) it kept: what stays is what non-private keeps,
    # plus the tile-pair cache
    pairs = sum(t.untyped_storage().nbytes() for t in _tiles._PAIRS_CACHE.values())
    extra = rows["dpkernels"]["resident_bytes"] - rows["non_private"]["resident_bytes"]
    assert 0 <= extra <= memory_model._rounded(pairs) * len(_tiles._PAIRS_CACHE)
    assert rows["non_private"]["peak_bytes"] <= rows["dpkernels"]["peak_bytes"] < 3 * rows["non_private"]["peak_bytes"]


def test_memory_model_command_writes_results(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.memory_model",
            "--smoke",
            "--modes",
            "non_private",
            "naive",
            "dpkernels",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(next(tmp_path.glob("memory_model-meta-*.json")).read_text())
    assert doc["environment"]["device"].startswith("meta")
    for res in doc["results"]:
        modes = {r["mode"]: r for r in res["modes"]}
        assert all(r["status"] == "ok" for r in modes.values()), res
        assert modes["non_private"]["peak_ratio"] == 1.0
        assert modes["naive"]["peak_ratio"] > 1.0  # per-example gradients exist in the naive step


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kind,cfg",
    [
        ("stack", models.StackConfig(width=384, depth=4, batch=24, seq=96)),
        ("gpt", models.GPTConfig(vocab=1000, seq=64, d_model=128, n_layer=2, n_head=4, d_mlp=512, batch=8)),
    ],
)
@pytest.mark.parametrize("mode", ["non_private", "dpkernels"])
def test_prediction_matches_cuda_allocator(kind, cfg, mode):
    """What a step adds on top of what is resident, predicted on meta vs measured on the GPU."""
    args = _args()
    predicted = memory_model.measure(kind, cfg, mode, "float32", args)
    assert predicted["status"] == "ok", predicted
    step_args = memory_model._step_args(args)
    step_args.dp_backend = None
    device = torch.device("cuda")
    w = bench_step.Workload(kind, kind, cfg, device, "float32", step_args)
    step, _set_noise, _keep, _model = bench_step.BUILDERS[mode](w)
    step()
    step()
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize()
    measured_extra = torch.cuda.max_memory_allocated(device) - resident
    predicted_extra = predicted["peak_bytes"] - predicted["resident_bytes"]
    assert abs(measured_extra - predicted_extra) <= 0.05 * predicted_extra + 2**20, (measured_extra, predicted_extra)
