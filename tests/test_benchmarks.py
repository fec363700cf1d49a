"""The benchmark script (issue 10) runs and writes what it prints; its numbers are not judged here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_prints_the_table_and_writes_the_same_numbers(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--samples", "2000", "--repeats", "2", "--workloads", "mlp",
         "--no-startup", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    mlp = json.loads(out.read_text())["throughput"]["mlp"]
    for variant in ("plain", "dlrun", "lightning"):
        assert mlp[f"{variant}_samples_per_s"] > 0
    repeats = mlp["repeats_samples_per_s"]  # each repeat's ratio, then their median (of two: the mean)
    vs_plain = [d / p for d, p in zip(repeats["dlrun"], repeats["plain"], strict=True)]
    assert mlp["ratio_vs_plain"] == pytest.approx(sum(vs_plain) / 2, rel=1e-3)
    assert mlp["ratio_vs_plain_range"] == pytest.approx(sorted(vs_plain), rel=1e-3)
    vs_lightning = [d / c for d, c in zip(repeats["dlrun"], repeats["lightning"], strict=True)]
    assert mlp["ratio_vs_lightning"] == pytest.approx(sum(vs_lightning) / 2, rel=1e-3)
    assert mlp["dlrun_samples_per_s"] == pytest.approx(sum(repeats["dlrun"]) / 2, abs=1)
    assert "dlrun / plain" in proc.stdout and f"{mlp['plain_samples_per_s']:,.0f}" in proc.stdout
    low, high = mlp["ratio_vs_plain_range"]
    assert f"{mlp['ratio_vs_plain']:.2f} ({low:.2f}-{high:.2f})" in proc.stdout


def test_the_csv_benchmark_times_each_stage_of_the_same_preparation(tmp_path):
    out = tmp_path / "csv.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/user_data.py", "--only", "csv", "--rows", "3000", "--repeats", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    csv = json.loads(out.read_text())["csv"]
    assert csv["rows"] == 3000 and csv["features"] == 215 and len(csv["rounds_s"]) == 2
    assert csv["cache_megabytes"] > 0 and all(csv[side]["ratio"] > 0 for side in ("first", "later"))
    stages = csv["stages"]
    writing = stages.pop("the cache's write, wall on its thread (within the stages above)")
    assert list(stages) == ["read", "text columns encoded (for the cache and the features)",
                            "load after the read (target; columns start encoding)",
                            "split (the cache written meanwhile, on a thread)",
                            "preprocess (fit on train, transform every split)",
                            "rest (tensors, batching path, spec; the cache's write waited for)", "total"]
    assert stages["read"][0] > 0 and writing[0] > 0 and stages["preprocess (fit on train, transform every split)"][0] > 0
    assert all(wall >= 0 for wall, _ in stages.values())
    assert sum(wall for stage, (wall, _) in stages.items() if stage != "total") == pytest.approx(stages["total"][0], abs=0.05)
    assert "preprocess (fit on train, transform every split)" in proc.stdout
