"""Every Triton kernel compiles for Hopper (sm_90), ahead of time, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks the kernels' arithmetic but not whether they
lower to GPU code; this compiles each one to a cubin in a subprocess without the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).parent


def _cuda_backend_usable() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:
        return False
    return True


# A second Python whose triton is the GPU machine's version (3.6): .ci/run builds one and names it
# here, since a kernel that compiles with the newest triton may not with the one that runs it.
COMPAT_PYTHON = os.environ.get("DPKERNELS_COMPAT_PYTHON")
PYTHONS = [pytest.param(sys.executable, id="installed-triton")]
PYTHONS.append(
    pytest.param(
        COMPAT_PYTHON,
        id="compat-triton",
        marks=pytest.mark.skipif(not COMPAT_PYTHON, reason="DPKERNELS_COMPAT_PYTHON not set (.ci/run sets it)"),
    )
)


@pytest.mark.skipif(not _cuda_backend_usable(), reason="this triton build has no NVIDIA backend")
@pytest.mark.parametrize("python", PYTHONS)
def test_all_kernels_compile_for_sm90(python):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [python, str(HERE / "compile_kernels_sm90.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    report = proc.stdout + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    assert report.count("ok ") >= 16, report
