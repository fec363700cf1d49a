"""Callbacks from the `callbacks` group: early stopping, checkpoints, progress, and the monitor's history."""

from __future__ import annotations

import math
import sys

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    ModelCheckpoint,
    RichModelSummary,
    RichProgressBar,
)

from dlrun.rundir import RunDir


class MonitorTracker(Checkpoint):
    """Remembers the best value of the monitored metric and the epoch it was reached (for summary.json).

    A `Checkpoint` subclass only so that Lightning calls it where it calls ModelCheckpoint: after the
    LightningModule has logged the epoch's training metrics, so a train/* monitor is current.
    """

    def __init__(self, monitor: str, mode: str):
        self.monitor = monitor
        self.mode = mode
        self.best_value: float | None = None
        self.best_epoch: int | None = None

    def _check(self, trainer: pl.Trainer) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.sanity_checking:
            return
        value = float(value)
        if math.isnan(value):
            return
        better = self.best_value is None or (value < self.best_value if self.mode == "min" else value > self.best_value)
        if better:
            self.best_value, self.best_epoch = value, trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        self._check(trainer)

    def state_dict(self):
        return {"best_value": self.best_value, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict):
        self.best_value = state_dict.get("best_value")
        self.best_epoch = state_dict.get("best_epoch")


def build_callbacks(cfg: DictConfig, run_dir: RunDir, validating: bool) -> tuple[list[Callback], MonitorTracker]:
    """The configured callbacks, plus the tracker that summary.json reads."""
    monitor, mode = cfg.monitor, cfg.mode
    # Without validation, metrics are logged at the end of the training epoch: check them there.
    on_train_end = not validating
    tracker = MonitorTracker(monitor, mode)
    callbacks: list[Callback] = [
        ModelCheckpoint(  # first: trainer.checkpoint_callback is the first Checkpoint in the list
            dirpath=run_dir.checkpoint_dir,
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_last=cfg.checkpoint.save_last,
            auto_insert_metric_name=False,
            enable_version_counter=False,
            save_on_train_epoch_end=on_train_end,
        ),
        tracker,
    ]
    es = cfg.early_stopping
    if es.enabled:
        callbacks.append(
            EarlyStopping(
                monitor=monitor,
                mode=mode,
                patience=es.patience,
                min_delta=es.min_delta,
                stopping_threshold=es.stopping_threshold,
                check_on_train_epoch_end=on_train_end,
                check_finite=False,  # a NaN loss is a result (diverged), reported by dlrun, not a stop reason here
            )
        )
    if cfg.model_summary:
        callbacks.append(RichModelSummary(max_depth=1))
    if show_progress_bar(cfg.progress_bar):
        callbacks.append(RichProgressBar(leave=False))
    return callbacks, tracker


def show_progress_bar(setting: bool | str) -> bool:
    if setting == "auto":
        return sys.stdout.isatty()
    return bool(setting)
