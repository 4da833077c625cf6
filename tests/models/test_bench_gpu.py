"""bench/gpu.py (the GPU check of the model code) cannot run in CI, which has no GPU; this keeps
it importable and its no-GPU answer clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_without_cuda_says_so_and_exits_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--quick"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert json.loads(out.stdout) == {"error": "no CUDA device"}
