"""Loggers from the `logger` group (composable: logger=[csv,wandb]). Each gets the run directory."""

from __future__ import annotations

import csv
import io
from argparse import Namespace
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from dlrun.rundir import write_atomic


class EpochCSVLogger(Logger):
    """`metrics.csv` in the run directory: one row per epoch, train and validation metrics side by side.

    Lightning logs training and validation epoch metrics in separate calls; this logger merges them
    by epoch and rewrites the file atomically after each epoch. Test metrics go to summary.json.
    """

    def __init__(self, save_dir: str | Path):
        super().__init__()
        self._path = Path(save_dir) / "metrics.csv"
        self._rows: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args, **kwargs) -> None:
        pass  # the resolved config is in config.yaml beside this file

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "epoch" not in metrics:
            return
        row = {k: v for k, v in metrics.items() if not k.startswith("test/")}
        if len(row) > 1:
            self._rows.setdefault(int(metrics["epoch"]), {}).update(row)
            self.save()

    @rank_zero_only
    def save(self) -> None:
        if not self._rows:
            return
        columns = ["epoch"] + sorted({k for row in self._rows.values() for k in row} - {"epoch"})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        for epoch in sorted(self._rows):
            writer.writerow({**self._rows[epoch], "epoch": epoch})
        write_atomic(self._path, out.getvalue())


def build_loggers(logger_cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """One Lightning logger per selected option, each writing under the run directory."""
    return [instantiate(cfg, save_dir=str(run_dir)) for cfg in logger_cfg.values() if cfg is not None]
