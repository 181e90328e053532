"""gemv.py's Triton kernel against F.linear, on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECK = r"""
import torch, torch.nn as nn
from gemv import gemv, GemvLinear, use_gemv
torch.manual_seed(0)
worst = {}
for N, K, bias in [(7, 33, False), (64, 1024, True), (130, 2500, False), (2, 3000, True)]:
    for dtype, bound in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        w, x = torch.randn(N, K).to(dtype), torch.randn(1, 1, K).to(dtype)
        b = torch.randn(N).to(dtype) if bias else None
        ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        err = ((gemv(x, w, b).double() - ref).norm() / ref.norm()).item()
        assert err < bound, (N, K, dtype, err)
        worst[str(dtype)] = max(worst.get(str(dtype), 0), err)
model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 8, bias=False))
use_gemv(model)
assert all(type(m) is GemvLinear for m in model) and model[0].weight.shape == (4, 8)
print("ok", worst)
"""


def test_gemv_matches_linear_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
