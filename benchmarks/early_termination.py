"""Early termination: the same random search on digits with and without a pruner (Optuna's ASHA).

    python benchmarks/early_termination.py [--trials 32] [--epochs 30] [--parallel 2] [--pruner asha] [--seed 0] [--json FILE]

Both searches draw the same trials (the same sampler seed, `--seed`; another seed is another search, on which
settings chosen on one can be checked): an MLP's learning rate (log-uniform) and
width. Each is a real `dlrun -m sweep=random` sweep, every job its own process. The table gives the
epochs trained over all jobs, the sweep's wall time, and the best validation loss found, read from the
jobs' summary.json files: over every job (a pruned job's best checkpoint is a model too; the sweep table
ranks it) and over the completed jobs alone (the study's best trial, optimization_results.yaml). Target
(issue 19): at least 3x fewer epochs for a best value within 2% of the unpruned search's.
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


def run_search(pruner: str, trials: int, epochs: int, parallel: int, seed: int, workdir: Path) -> dict:
    """One sweep; its epochs trained (over every job), wall time, best value and job counts."""
    sweep_dir, wall = timed_sweep(
        ["sweep=random", f"sweep.n_trials={trials}", f"sweep.seed={seed}", f"sweep.pruner={pruner}", *SPACE, "dataset=digits",
         f"trainer.max_epochs={epochs}", "callbacks.early_stopping.enabled=false", f"hydra.launcher.n_jobs={parallel}",
         "print_config=false", "callbacks.progress_bar=false", "callbacks.model_summary=false"], workdir / pruner)
    jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    trained = sum(j["epochs"] or 0 for j in jobs)  # whole epochs: a pruned job's last, cut short, is not counted
    scored = [j for j in jobs if isinstance(j["best_value"], float) and math.isfinite(j["best_value"])]
    completed = [j["best_value"] for j in scored if j["status"] == "completed"]
    return {"pruner": pruner, "jobs": len(jobs), "pruned": sum(j["status"] == "pruned" for j in jobs),
            "epochs_trained": trained, "wall_seconds": round(wall, 2),
            "best_val_loss": min(j["best_value"] for j in scored) if scored else None,
            "best_completed_val_loss": min(completed) if completed else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30, help="trainer.max_epochs of every job")
    parser.add_argument("--parallel", type=int, default=2, help="hydra.launcher.n_jobs")
    parser.add_argument("--pruner", default="asha", choices=["median", "asha", "hyperband"])
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed: which trials both searches draw")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_search(p, args.trials, args.epochs, args.parallel, args.seed, Path(tmp)) for p in ("none", args.pruner)]
    full, pruned = results
    table = Table("pruner", "jobs", "pruned", "epochs trained", "sweep wall s", "best val/loss", "of completed jobs",
                  title=f"{args.trials}-trial random search on digits (MLP: lr, width), {args.epochs} epochs a job, "
                        f"{args.parallel} at a time, seed {args.seed}, {os.cpu_count()} CPU cores")
    for r in results:
        table.add_row(r["pruner"], str(r["jobs"]), str(r["pruned"]), str(r["epochs_trained"]),
                      f"{r['wall_seconds']:.1f}", *(_shown(r[key]) for key in ("best_val_loss", "best_completed_val_loss")))
    console = Console()
    console.print(table)
    fewer = full["epochs_trained"] / max(pruned["epochs_trained"], 1)
    gaps = {key: _gap(pruned[key], full[key]) for key in ("best_val_loss", "best_completed_val_loss")}
    console.print(f"{fewer:.2f}x fewer epochs, {full['wall_seconds'] / max(pruned['wall_seconds'], 1e-9):.2f}x faster, "
                  "best value " + " and ".join("—" if gap is None else f"{gap:+.1%}" for gap in gaps.values())
                  + " (of every job and of the completed ones) from the unpruned search's")
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "trials": args.trials, "epochs": args.epochs,
                                         "parallel": args.parallel, "seed": args.seed, "runs": results, "epochs_ratio": round(fewer, 3),
                                         "best_gap": gaps["best_val_loss"],
                                         "best_completed_gap": gaps["best_completed_val_loss"]}, indent=2) + "\n")


def _shown(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _gap(pruned: float | None, full: float | None) -> float | None:
    """How far the pruned search's best is from the unpruned one's, relative (+: worse, for a loss)."""
    return None if pruned is None or not full else round((pruned - full) / abs(full), 5)


if __name__ == "__main__":
    main()
