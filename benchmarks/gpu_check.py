"""On a machine with GPUs: does dlrun train there, at each precision, with DDP, in a GPU-sharing sweep, and how fast?

    python benchmarks/gpu_check.py            # one table
    python benchmarks/gpu_check.py --json     # the same rows as JSON

Each check is a real `dlrun` process (data: scikit-learn's digits, no download) in a temporary output
directory; its row says whether every run completed, the monitored value and the wall time:

  bf16-mixed, 16-mixed   one GPU (hardware=gpu) at that precision
  multi_gpu              every visible GPU, one DDP process each (only with two or more GPUs)
  sweep, 2 jobs/GPU      a two-job sweep sharing one GPU (dlrun's launcher, jobs_per_gpu=2)
  throughput             benchmarks/run.py --quick --device cuda: plain loop, dlrun, Lightning on the GPU

Without a GPU it says so and exits 0: there is nothing to check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

BENCHMARKS = Path(__file__).resolve().parent
DLRUN = [sys.executable, "-m", "dlrun.cli"]
RUN = ["dataset=digits", "trainer.max_epochs=3", "print_config=false", "callbacks.progress_bar=false"]


def _run(command: list[str], output_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "DLRUN_OUTPUT_DIR": str(output_dir)}
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=output_dir, capture_output=True, text=True, timeout=1800)
    return proc, time.perf_counter() - start


def dlrun_check(name: str, overrides: list[str], expected_runs: int) -> dict[str, Any]:
    """Run dlrun with these overrides; ok when `expected_runs` summaries say completed."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, seconds = _run([*DLRUN, *overrides], Path(tmp))
        summaries = [json.loads(p.read_text()) for p in sorted(Path(tmp).rglob("summary.json"))]
    completed = [s for s in summaries if s.get("status") == "completed"]
    ok = proc.returncode == 0 and len(completed) == expected_runs
    values = ", ".join(f"{s.get('monitor')}={s['best_value']:.4f}" for s in completed if s.get("best_value") is not None)
    detail = values if ok else (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"check": name, "command": "dlrun " + " ".join(overrides), "ok": ok, "seconds": round(seconds, 1),
            "result": detail}


def throughput_check() -> dict[str, Any]:
    """benchmarks/run.py on the GPU, one repeat of its quick workloads; the result is dlrun's samples/s."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "throughput.json"
        command = [sys.executable, str(BENCHMARKS / "run.py"), "--quick", "--no-startup", "--repeats", "1",
                   "--device", "cuda", "--json", str(out)]
        proc, seconds = _run(command, Path(tmp))
        numbers = json.loads(out.read_text())["throughput"] if out.exists() else {}
    ok = proc.returncode == 0 and bool(numbers)
    detail = "; ".join(f"{w} {r['dlrun_samples_per_s']:,.0f}/s ({r['ratio_vs_plain']:.2f} of plain)"
                       for w, r in numbers.items()) if ok else (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"check": "throughput", "command": "benchmarks/run.py --quick --device cuda", "ok": ok,
            "seconds": round(seconds, 1), "result": detail, "throughput": numbers}


def checks(n_gpus: int) -> list[dict[str, Any]]:
    rows = [dlrun_check(precision, [*RUN, "model=cnn", "hardware=gpu", f"hardware.precision={precision}"], 1)
            for precision in ("bf16-mixed", "16-mixed")]
    if n_gpus >= 2:
        rows.append(dlrun_check("multi_gpu", [*RUN, "model=cnn", "hardware=multi_gpu"], 1))
    rows.append(dlrun_check("sweep, 2 jobs/GPU", ["-m", *RUN, "model=mlp,cnn", "hardware=gpu",
                                                  "hydra.launcher.jobs_per_gpu=2"], 2))
    rows.append(throughput_check())
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    args = parser.parse_args(argv)
    console = Console()
    if not torch.cuda.is_available():
        message = "no CUDA GPU visible to torch: nothing to check (run this on a GPU node)"
        print(json.dumps({"gpus": [], "checks": [], "note": message}) if args.json else message)
        return 0
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    rows = checks(len(gpus))
    if args.json:
        print(json.dumps({"gpus": gpus, "torch": torch.__version__, "checks": rows}, indent=2))
    else:
        table = Table(title=f"dlrun GPU check: {len(gpus)} x {gpus[0]}, torch {torch.__version__}")
        for column in ("check", "ok", "seconds", "result", "command"):
            table.add_column(column, justify="right" if column == "seconds" else "left")
        for row in rows:
            table.add_row(row["check"], "yes" if row["ok"] else "[red]NO[/red]", f"{row['seconds']:.1f}",
                          row["result"], row["command"])
        console.print(table)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
