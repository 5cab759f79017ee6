"""bench/bench_compile.py --smoke: eager and compiled steps, private and not, run and check themselves
(the compiled private gradient equals the eager one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_compile_benchmark_smoke(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TRITON_INTERPRET": "0",
    }
    env.pop("DPKERNELS_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_compile.py"), "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(next(tmp_path.glob("compile_step-*.json")).read_text())
    assert {r["workload"] for r in doc["results"]} == {"mlp", "gpt"}
    for r in doc["results"]:
        assert r["dp_compiled_vs_eager_grad_rel_err"] < 1e-4, r["workload"]
        for mode in ("eager", "compiled", "dp_eager", "dp_compiled"):
            assert r["modes"][mode]["vs_eager"] > 0 and r["modes"][mode]["median_ms"] > 0
        assert r["modes"]["eager"]["vs_eager"] == 1.0 and r["modes"]["compiled"]["vs_compiled"] == 1.0
        assert r["modes"]["dp_compiled"]["compile_s"] > 0
