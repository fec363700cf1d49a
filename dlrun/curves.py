"""`curves.png`: a run's learning curves, the first diagnostic of training.

Up to three panels against the epoch: training (and, with trainer.train_eval, train_eval) and validation
loss, the task's main score (accuracy, R²,
bits per character or F1: the first of these that metrics.csv has), the learning rate, and, on each,
the best epoch and the epoch where the run stopped (early stop, divergence, interruption). Drawn from
the run directory's files alone (metrics.csv, the summary, config.yaml's max_epochs), so that any tool
can redraw it later: `dlrun.curves.write_curves(run_dir)`.

Uses matplotlib's Figure directly (the Agg canvas), never pyplot: no display, no global state.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dlrun.rundir import read_summary_file, write_atomic

CURVES_FILE = "curves.png"
# the task's headline score, in the order dlrun.sweep.summary ranks test metrics
MAIN_SCORES = ("acc", "r2", "bpc", "f1")


def read_metrics(path: Path) -> dict[str, list[float]]:
    """metrics.csv as columns (epoch first); missing cells are NaN, so that every column lines up."""
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0]) if rows else []
    return {c: [float(r[c]) if r.get(c) not in ("", None) else math.nan for r in rows] for c in columns}


def main_score(columns: Mapping[str, Any]) -> str | None:
    """The task's main score among the logged metric names ('acc', 'r2', ...), or None."""
    return next((s for s in MAIN_SCORES if f"val/{s}" in columns or f"train/{s}" in columns), None)


def stop_note(summary: Mapping[str, Any], max_epochs: int | None, last_epoch: int | None) -> tuple[str, int] | None:
    """(how, epoch) when the run ended before its last planned epoch; None when it ran them all."""
    status = summary.get("status")
    if status == "completed":
        early = max_epochs is not None and last_epoch is not None and last_epoch + 1 < max_epochs
        return ("early stop", last_epoch) if early else None
    if status not in ("diverged", "interrupted", "failed", "pruned"):
        return None
    epoch = (summary.get("diverged") or {}).get("epoch", last_epoch)
    return (status, epoch) if isinstance(epoch, int) else None


def write_curves(run_dir: str | Path, summary: Mapping[str, Any] | None = None) -> Path:
    """Draw `<run dir>/curves.png` (atomically) from its metrics.csv and summary (summary.json if not given)."""
    run_dir = Path(run_dir)
    if summary is None:
        saved = read_summary_file(run_dir / "summary.json")
        summary = saved.to_json() if saved is not None else {}
    image = draw(read_metrics(run_dir / "metrics.csv"), summary, _max_epochs(run_dir / "config.yaml"))
    path = run_dir / CURVES_FILE
    write_atomic(path, image)
    return path


def draw(columns: Mapping[str, list[float]], summary: Mapping[str, Any], max_epochs: int | None) -> bytes:
    """The PNG's bytes: loss, main score and learning rate against the epoch, best and stop marked.
    A run that logged no epoch (diverged at its first steps, or without logger=csv) gets a panel saying so."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = columns.get("epoch") or []
    score = main_score(columns)
    # train_eval/* (trainer.train_eval) where logged: the training data in evaluation mode, beside val/*
    panels: list[tuple[str, list[str]]] = [("loss", ["train/loss", "train_eval/loss", "val/loss"])]
    if score:
        panels.append((score, [f"train/{score}", f"train_eval/{score}", f"val/{score}"]))
    if "lr" in columns:
        panels.append(("learning rate", ["lr"]))
    fig = Figure(figsize=(4.0 * len(panels), 3.4))
    # fixed margins: a constrained layout would draw the figure twice (half the cost of a run's last second)
    fig.subplots_adjust(left=0.25 / len(panels), right=0.98, bottom=0.14, top=0.84, wspace=0.3)
    best = summary.get("best_epoch")
    stop = stop_note(summary, max_epochs, int(epochs[-1]) if epochs else None)
    for i, (title, names) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name in names:
            if name in columns and any(not math.isnan(v) for v in columns[name]):
                ax.plot(epochs, columns[name], marker="." if len(epochs) < 30 else None, label=name)
        if title == "learning rate" and min(columns["lr"]) > 0 and max(columns["lr"]) / min(columns["lr"]) > 20:
            ax.set_yscale("log")
        if isinstance(best, int) and epochs:
            ax.axvline(best, color="tab:green", linestyle="--", linewidth=1, label=f"best (epoch {best})")
        if stop:
            ax.axvline(stop[1], color="tab:red", linestyle=":", linewidth=1.2, label=f"{stop[0]} (epoch {stop[1]})")
        if not epochs:
            ax.text(0.5, 0.5, "no epoch logged\n(metrics.csv is empty or absent)", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    monitor, value = summary.get("monitor"), summary.get("best_value")
    headline = f"{summary.get('status', 'running')}"
    if monitor and isinstance(value, (int, float)) and math.isfinite(value):
        headline += f" · best {monitor} = {value:.4g}"
    fig.suptitle(headline)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=90)
    return image.getvalue()


def _max_epochs(config_file: Path) -> int | None:
    """trainer.max_epochs of the run's resolved config (safe_load: the file is data, never code)."""
    try:
        value = (yaml.safe_load(config_file.read_text()) or {}).get("trainer", {}).get("max_epochs")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None
