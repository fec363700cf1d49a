"""What starting a sweep's job costs: the same `debug=fast` jobs started as fresh processes and forked from the
sweep's warm fork server, against the jobs' own time (from their summaries).

    python benchmarks/job_startup.py [--jobs 16] [--json FILE]

Each variant is one real `dlrun -m seed=0,...,N-1 debug=fast` sweep, one job at a time. Per job:
`process` is the launcher's wall time from starting the job to seeing it end; `own` is the run's own
`wall_seconds` (building data and model, training, testing: what is left once Python and the imports
are paid for); their difference is the start-up overhead. `to first step` is summary.json's
`startup_seconds` (from the process start, or for a forked job from the fork, to the first training step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table
from timed_sweep import timed_sweep  # beside this file: python puts benchmarks/ on the path

VARIANTS = {"fresh process": "false", "fork server": "true"}  # hydra.launcher.fork_server


def run_sweep(n_jobs: int, fork_server: str, workdir: Path) -> dict:
    """One sweep of `n_jobs` seeds: its wall time and the per-job means."""
    seeds = ",".join(str(s) for s in range(n_jobs))
    sweep_dir, wall = timed_sweep([f"seed={seeds}", "debug=fast", "print_config=false", "callbacks.progress_bar=false",
                                   f"hydra.launcher.fork_server={fork_server}"], workdir / f"fork_server_{fork_server}")
    summaries = [json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")]
    process = [s["sweep_job"]["process_seconds"] for s in summaries]
    own = [s["wall_seconds"] for s in summaries]
    return {
        "fork_server": fork_server == "true",
        "jobs": len(summaries),
        "forked_jobs": sum(bool(s["sweep_job"].get("forked")) for s in summaries),
        "sweep_wall_seconds": round(wall, 2),
        "mean_process_seconds": round(statistics.mean(process), 3),
        "mean_own_seconds": round(statistics.mean(own), 3),
        "mean_overhead_seconds": round(statistics.mean(p - o for p, o in zip(process, own, strict=True)), 3),
        "mean_seconds_to_first_step": round(statistics.mean(s["startup_seconds"] for s in summaries), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_sweep(args.jobs, flag, Path(tmp)) for name, flag in VARIANTS.items()}
    table = Table("job start", "jobs (forked)", "sweep wall s", "per job s", "own s", "overhead s", "to first step s",
                  title=f"{args.jobs} debug=fast jobs, one at a time, on {os.cpu_count()} CPU cores")
    for name, r in results.items():
        table.add_row(name, f"{r['jobs']} ({r['forked_jobs']})", f"{r['sweep_wall_seconds']:.1f}",
                      f"{r['mean_process_seconds']:.2f}", f"{r['mean_own_seconds']:.2f}",
                      f"{r['mean_overhead_seconds']:.2f}", f"{r['mean_seconds_to_first_step']:.2f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "variants": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
