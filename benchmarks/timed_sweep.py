"""One real `dlrun -m` sweep, timed: what the sweep benchmarks (sweep_parallel, job_startup,
early_termination) each run, with their own arguments."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def timed_sweep(args: list[str], out: Path) -> tuple[Path, float]:
    """Run `dlrun -m ARGS` with `out` as its output root (DLRUN_OUTPUT_DIR, fresh per call): the sweep's
    directory and the wall seconds the whole command took. A failed sweep ends the benchmark."""
    env = {**os.environ, "DLRUN_OUTPUT_DIR": str(out)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dlrun.cli", "-m", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    (sweep_dir,) = (out / "sweeps").iterdir()
    return sweep_dir, wall
