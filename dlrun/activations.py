"""`activations.csv` and `activations.png`: every activation layer's outputs at each validation, layer by
layer: the notes' check that signals neither vanish nor saturate with depth (004 §4.2.2, Fig. 58: σ = 0.01
makes tanh activations shrink layer after layer, σ = 0.2 pins them at ±1) and their training-issue list
(004 §6.4.5: watch each layer's activations, a standard deviation of 0.5 to 2 is healthy).

`ActivationLog` (the callbacks group's `activations` entry, off by default) asks the run's metrics to
measure every activation module (ReLU, tanh, sigmoid, ...; dlrun/training/metrics.py's ActivationProbe,
the hooks that also count val/dead_relu) during validation, and after each epoch appends one row per layer
to `activations.csv`: epoch, layer, kind, mean, std, saturated (tanh, sigmoid: the fraction of outputs
within 0.01 of a bound), dead (ReLU: the fraction of its units no validation sample makes positive). Epoch
-1 is the network before training, measured by Lightning's sanity check (trainer.num_sanity_val_steps
validation batches). When training ends, however it ends, `activations.png` draws the three statistics
against depth, one line per epoch.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from dlrun.rundir import RunDir, write_atomic

ACTIVATIONS_CSV = "activations.csv"
ACTIVATIONS_FILE = "activations.png"
COLUMNS = ("epoch", "layer", "kind", "mean", "std", "saturated", "dead")
_EPOCHS_DRAWN = 6  # the first and last logged epochs and evenly spaced ones between


class ActivationLog(Callback):
    """Per-layer activation statistics at each validation, to activations.csv; activations.png at the end."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.path / ACTIVATIONS_CSV

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.metrics.track_layers()

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats = pl_module.metrics.layer_stats.pop("val", None)
        if stats and trainer.current_epoch == 0 and trainer.global_step == 0:  # not a resumed run's
            self._append(trainer, -1, stats)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats = pl_module.metrics.layer_stats.pop("val", None)
        if stats:
            self._append(trainer, trainer.current_epoch, stats)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._draw(trainer)

    def _append(self, trainer: pl.Trainer, epoch: int, stats: list) -> None:
        if not trainer.is_global_zero:
            return
        new = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(COLUMNS)
            for s in stats:
                writer.writerow([epoch, s.layer, s.kind, s.mean, s.std, _cell(s.saturated), _cell(s.dead)])

    def _draw(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero and self.path.exists():
            write_atomic(self.path.with_name(ACTIVATIONS_FILE), draw(read_activations(self.path)))


def _cell(value: float | None) -> str | float:
    return "" if value is None else value


def read_activations(path: Path) -> dict[int, list[dict]]:
    """activations.csv as {epoch: its layers' rows, in network order}; empty cells are None."""
    epochs: dict[int, list[dict]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            values = {k: (float(row[k]) if row[k] not in ("", None) else None) for k in ("mean", "std", "saturated", "dead")}
            epochs.setdefault(int(row["epoch"]), []).append({"layer": row["layer"], "kind": row["kind"], **values})
    return epochs


def draw(epochs: dict[int, list[dict]]) -> bytes:
    """The PNG's bytes: mean, standard deviation and saturated/dead fraction per layer, one line per epoch."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    logged = sorted(epochs)
    if len(logged) > _EPOCHS_DRAWN:
        picks = {logged[round(i * (len(logged) - 1) / (_EPOCHS_DRAWN - 1))] for i in range(_EPOCHS_DRAWN)}
        logged = sorted(picks)
    fig = Figure(figsize=(12.0, 3.4))
    fig.subplots_adjust(left=0.06, right=0.86, bottom=0.2, top=0.86, wspace=0.3)
    panels = [("mean", "mean"), ("std", "standard deviation"), ("fraction", "saturated (tanh, sigmoid) / dead (ReLU)")]
    colors = colormaps["viridis"]
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for j, epoch in enumerate(logged):
            rows = epochs[epoch]
            values = [(r["saturated"] if r["saturated"] is not None else r["dead"]) if key == "fraction" else r[key]
                      for r in rows]
            shown = [math.nan if v is None else v for v in values]
            label = "before training" if epoch < 0 else f"epoch {epoch}"
            ax.plot(range(len(rows)), shown, marker="o", markersize=3, color=colors(j / max(len(logged) - 1, 1)),
                    label=label)
        layers = epochs[logged[-1]]
        ax.set_xticks(range(len(layers)), [f"{r['layer']}\n{r['kind']}" for r in layers], fontsize="x-small",
                      rotation=45 if len(layers) > 6 else 0)
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3)
        if key == "fraction":
            ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("activations per layer on the validation split (input to output)")
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=90)
    return image.getvalue()
