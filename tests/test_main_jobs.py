"""The README's main job and the benchmark suite run end to end (small settings, CPU).

Keeps the README's first command and `bash bench/run_all.sh` from rotting: the demo must train
and report, and every benchmark script must run its smoke mode with the dpkernels step agreeing
with the per-example reference loop.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_demo_trains_privately_and_reports(model):
    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpkernels.demo",
            "--epochs",
            "2",
            "--batch-size",
            "256",
            "--lr",
            "0.2",
            "--model",
            model,
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    private = lines["dpkernels"]
    accuracy, epsilon = float(private[1]), float(private[2])
    assert 0.0 <= accuracy <= 1.0
    assert epsilon == pytest.approx(3.0, rel=0.02)  # the calibrated target, as the accountant reports it
    assert float(lines["non-private"][1]) > 0.5


def test_benchmark_smoke_runs_every_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = {p.name.split("-")[0] for p in tmp_path.glob("*.json")}
    assert {"linear_ops", "step", "floor", "layer_ops", "tied"} <= names
    layer_ops = json.loads(next(tmp_path.glob("layer_ops-*.json")).read_text())
    for res in layer_ops["results"]:
        assert not res.get("skipped") and all(r["status"] == "ok" for r in res["rows"]), res
        assert res["check_rel_err"] < 1e-4, res
    step = json.loads(next(tmp_path.glob("step-*.json")).read_text())
    for workload in step["results"]:
        modes = {m["mode"]: m for m in workload["modes"]}
        for name in ("non_private", "naive", "dpkernels"):
            assert modes[name]["status"] == "ok", (workload["describe"], modes[name])
        assert modes["dpkernels"]["grad_rel_err_vs_loop"] < 1e-4, workload["describe"]


def test_cpu_benchmarks_smoke(tmp_path):
    """bench/bench_cpu.py (the CPU step against the peers, with the phase profile) and
    bench/bench_cpu_norms.py (the torch backend's conv norm methods) run and check themselves."""
    env = {**_env(), "TRITON_INTERPRET": "0"}
    for script in ("bench_cpu.py", "bench_cpu_norms.py"):
        args = [sys.executable, str(ROOT / "bench" / script), "--smoke", "--out-dir", str(tmp_path)]
        proc = subprocess.run(
            args + (["--profile"] if script == "bench_cpu.py" else []),
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    step = json.loads(next(tmp_path.glob("cpu_step-*.json")).read_text())
    for workload in step["results"]:
        modes = workload["modes"]
        for name in ("non_private", "naive", "dpkernels"):
            assert modes[name]["status"] == "ok", (workload["describe"], modes[name])
            assert modes[name]["ratio"] > 0
        assert modes["dpkernels"]["grad_rel_err_vs_loop"] < 1e-4, workload["describe"]
        shares = workload["profile"]
        assert set(shares) == {"norms", "clip_factors", "clipped_sums", "noise", "rest of the step"}
        assert all(v >= 0 for k, v in shares.items() if k != "rest of the step") and sum(
            shares.values()
        ) == pytest.approx(100)
    norms = json.loads(next(tmp_path.glob("cpu_conv_norms-*.json")).read_text())
    for row in norms["results"]:
        assert row["max_rel_diff"] < 1e-4 and row["auto_ms"] > 0, row


def test_readme_quick_example_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Quick example", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md (quick example)", "exec"), namespace)
    assert 0 < namespace["accountant"].epsilon(delta=1e-5) < 10


def test_demo_gpt2_trains_privately_and_reports():
    pytest.importorskip("transformers")
    proc = subprocess.run(
        [sys.executable, "-m", "dpkernels.demo", "--model", "gpt2", "--epochs", "1"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert "stdlib" in lines and "T=64" in lines["stdlib"]  # the corpus header
    untrained = float(lines["untrained"][4])
    private, non_private = lines["dpkernels"], lines["non-private"]
    perplexity, epsilon = float(private[1]), float(private[2])
    assert epsilon == pytest.approx(3.0, rel=0.02)  # the calibrated target, as the accountant reports it
    for value in (untrained, perplexity, float(non_private[1])):
        assert math.isfinite(value) and value > 0
    assert untrained == pytest.approx(256, rel=0.1)  # a random init guesses the bytes about uniformly
    assert perplexity < 0.5 * untrained  # the private run trained: uniform over 256 bytes is 256
    assert float(non_private[1]) < 0.5 * untrained
