"""Triton is optional: without it the package imports, trains privately on the torch backend,
reports the missing backend, and refuses an explicit request for it with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import sys
sys.modules["triton"] = None          # as if triton were not installed
import torch, torch.nn as nn
import dpkernels
from dpkernels import functional

info = dpkernels.backends(load_cuda=False)
assert info["triton"]["available"] is False and "not installed" in info["triton"]["reason"], info
model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model, opt = dpkernels.make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
model(torch.randn(4, 5)).sum().backward()
opt.step()
assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
try:
    functional.linear_sq_norms(torch.randn(2, 3), torch.randn(2, 4), backend="triton")
except RuntimeError as e:
    assert "triton is not installed" in str(e), e
else:
    raise AssertionError("backend='triton' without triton must raise")
print("ok")
"""


def test_package_works_without_triton():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("DPKERNELS_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
