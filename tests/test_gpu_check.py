"""benchmarks/gpu_check.py on a machine (or with CUDA_VISIBLE_DEVICES="") without a GPU: it says so, exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.parametrize("as_json", [False, True])
def test_gpu_check_without_a_gpu_says_so_and_succeeds(as_json):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # torch then sees no GPU, on any machine
    proc = subprocess.run([sys.executable, str(SCRIPT), *(["--json"] if as_json else [])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if as_json:
        assert json.loads(proc.stdout) == {"gpus": [], "checks": [],
                                           "note": "no CUDA GPU visible to torch: nothing to check (run this on a GPU node)"}
    else:
        assert "no CUDA GPU" in proc.stdout and "Traceback" not in proc.stderr
