"""Speed-up of running a sweep's jobs in parallel: the same 8 small jobs, 1 at a time and 2 at a time.

    python benchmarks/sweep_parallel.py [--jobs 8] [--parallel 2] [--json FILE]

Each job is a real `dlrun` process (a short debug=fast run), so the time includes what a sweep's job
really costs: starting Python and importing torch and Lightning, which dominates small jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table
from timed_sweep import timed_sweep  # beside this file: python puts benchmarks/ on the path


def run_sweep(n_jobs: int, parallel: int, workdir: Path) -> dict:
    """Run one `dlrun -m` sweep of `n_jobs` seeds, `parallel` at a time; its wall time and job times."""
    seeds = ",".join(str(s) for s in range(n_jobs))
    sweep_dir, wall = timed_sweep([f"seed={seeds}", "debug=fast", f"hydra.launcher.n_jobs={parallel}"],
                                  workdir / f"parallel_{parallel}")
    jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    return {"parallel": parallel, "jobs": len(jobs), "wall_seconds": round(wall, 2),
            "mean_job_seconds": round(sum(j["seconds"] for j in jobs) / len(jobs), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_sweep(args.jobs, p, Path(tmp)) for p in (1, args.parallel)]
    speedup = results[0]["wall_seconds"] / results[1]["wall_seconds"]
    table = Table("jobs at once", "jobs", "sweep wall s", "mean run s (inside the job)", "speed-up",
                  title=f"{args.jobs} debug=fast jobs on {os.cpu_count()} CPU cores")
    for r in results:
        table.add_row(str(r["parallel"]), str(r["jobs"]), f"{r['wall_seconds']:.1f}", f"{r['mean_job_seconds']:.1f}",
                      f"{results[0]['wall_seconds'] / r['wall_seconds']:.2f}x")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "runs": results, "speedup": round(speedup, 3)},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
