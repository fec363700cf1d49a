"""Early termination: the same random search on digits with and without a pruner (Optuna's ASHA).

    python benchmarks/early_termination.py [--trials 32] [--epochs 30] [--parallel 2] [--pruner asha] [--json FILE]

Both searches draw the same trials (the same sampler seed): an MLP's learning rate (log-uniform) and
width. Each is a real `dlrun -m sweep=random` sweep, every job its own process. The table gives the
epochs trained over all jobs, the sweep's wall time, and the best validation loss found, read from the
jobs' summary.json files. Target (issue 19): at least 3x fewer epochs for a best value within 2% of the
unpruned search's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table
from timed_sweep import timed_sweep  # beside this file: python puts benchmarks/ on the path

SPACE = ["optim.lr=tag(log,interval(1e-4,3e-1))", "model.width=choice(16,32,64,128,256)"]


def run_search(pruner: str, trials: int, epochs: int, parallel: int, workdir: Path) -> dict:
    """One sweep; its epochs trained (over every job), wall time, best value and job counts."""
    sweep_dir, wall = timed_sweep(
        ["sweep=random", f"sweep.n_trials={trials}", "sweep.seed=0", f"sweep.pruner={pruner}", *SPACE, "dataset=digits",
         f"trainer.max_epochs={epochs}", "callbacks.early_stopping.enabled=false", f"hydra.launcher.n_jobs={parallel}",
         "print_config=false", "callbacks.progress_bar=false", "callbacks.model_summary=false"], workdir / pruner)
    jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    trained = sum(j["epochs"] or 0 for j in jobs)  # whole epochs: a pruned job's last, cut short, is not counted
    values = [j["best_value"] for j in jobs if isinstance(j["best_value"], float) and math.isfinite(j["best_value"])]
    return {"pruner": pruner, "jobs": len(jobs), "pruned": sum(j["status"] == "pruned" for j in jobs),
            "epochs_trained": trained, "wall_seconds": round(wall, 2), "best_val_loss": min(values) if values else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30, help="trainer.max_epochs of every job")
    parser.add_argument("--parallel", type=int, default=2, help="hydra.launcher.n_jobs")
    parser.add_argument("--pruner", default="asha", choices=["median", "asha", "hyperband"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_search(p, args.trials, args.epochs, args.parallel, Path(tmp)) for p in ("none", args.pruner)]
    full, pruned = results
    table = Table("pruner", "jobs", "pruned", "epochs trained", "sweep wall s", "best val/loss",
                  title=f"{args.trials}-trial random search on digits (MLP: lr, width), {args.epochs} epochs a job, "
                        f"{args.parallel} at a time, {os.cpu_count()} CPU cores")
    for r in results:
        best = "—" if r["best_val_loss"] is None else f"{r['best_val_loss']:.4f}"
        table.add_row(r["pruner"], str(r["jobs"]), str(r["pruned"]), str(r["epochs_trained"]),
                      f"{r['wall_seconds']:.1f}", best)
    console = Console()
    console.print(table)
    fewer = full["epochs_trained"] / max(pruned["epochs_trained"], 1)
    gap = None
    if full["best_val_loss"] and pruned["best_val_loss"] is not None:
        gap = (pruned["best_val_loss"] - full["best_val_loss"]) / abs(full["best_val_loss"])
    console.print(f"{fewer:.2f}x fewer epochs, {full['wall_seconds'] / max(pruned['wall_seconds'], 1e-9):.2f}x faster"
                  + ("" if gap is None else f", best value {gap:+.1%} from the unpruned search's"))
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "trials": args.trials, "epochs": args.epochs,
                                         "parallel": args.parallel, "runs": results, "epochs_ratio": round(fewer, 3),
                                         "best_gap": None if gap is None else round(gap, 5)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
