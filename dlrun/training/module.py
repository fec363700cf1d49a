"""The one LightningModule: a network, a task, an optimizer, a schedule and the regularizers."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from dlrun.training.optimizers import build_optimizer
from dlrun.training.regularizers import Regularizer
from dlrun.training.schedulers import build_scheduler
from dlrun.training.tasks import Task

STAGES = ("train", "val", "test")


class Experiment(pl.LightningModule):
    """Trains `network` on `task`. Logs epoch metrics named `<stage>/<metric>` (train/loss, val/acc, ...).

    Per-batch statistics stay on the device as running sums and are reduced (across DDP ranks too) once
    per epoch: no `.item()` per step, which would stall a GPU pipeline.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        task: Task,
        optim: DictConfig,
        scheduler: DictConfig,
        regularizers: Sequence[Regularizer] = (),
        monitor: str = "val/loss",
    ):
        super().__init__()
        self.network = network
        self.task = task
        self.optim_cfg = optim
        self.scheduler_cfg = scheduler
        self.regularizers = list(regularizers)
        self.monitor = monitor
        self._sums: dict[str, dict[str, torch.Tensor]] = {stage: {} for stage in STAGES}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    # --- steps ------------------------------------------------------------------------------------
    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        output = self.network(x)
        loss = self.task.loss(output, y)
        self._accumulate(stage, self.task.stats(output.detach(), y, loss.detach()))
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        terms = [t for t in (r.penalty(self.network) for r in self.regularizers) if t is not None]
        if terms:
            penalty = torch.stack([torch.as_tensor(t, device=loss.device) for t in terms]).sum()
            self._accumulate("train", {"penalty": penalty.detach(), "steps": torch.ones((), device=loss.device)})
            loss = loss + penalty
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    # --- epoch metrics ----------------------------------------------------------------------------
    def _accumulate(self, stage: str, stats: dict[str, torch.Tensor]) -> None:
        sums = self._sums[stage]
        for key, value in stats.items():
            value = value.detach().to(torch.float64)
            sums[key] = sums[key] + value if key in sums else value

    def _epoch_metrics(self, stage: str) -> dict[str, float]:
        sums, self._sums[stage] = self._sums[stage], {}
        if not sums:
            return {}
        keys = sorted(sums)
        stacked = torch.stack([sums[k] for k in keys])
        stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum") if self.trainer.world_size > 1 else stacked
        totals = dict(zip(keys, stacked.tolist(), strict=True))  # the one host sync per epoch
        metrics = self.task.metrics(totals)
        if "penalty" in totals:
            metrics["penalty"] = totals["penalty"] / max(totals["steps"], 1.0)
        return {f"{stage}/{name}": value for name, value in metrics.items()}

    def _log_stage(self, stage: str) -> None:
        metrics = self._epoch_metrics(stage)
        if metrics and not self.trainer.sanity_checking:
            self.log_dict(metrics, on_epoch=True, sync_dist=False)  # already reduced across ranks

    def on_train_epoch_end(self) -> None:
        metrics = self._epoch_metrics("train")
        metrics["lr"] = self.optimizers().param_groups[0]["lr"]
        self.log_dict(metrics, on_epoch=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_stage("val")

    def on_test_epoch_end(self) -> None:
        self._log_stage("test")

    # --- optimization -----------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = build_optimizer(self.optim_cfg, self.network.parameters())
        schedule = build_scheduler(self.scheduler_cfg, optimizer, self.monitor)
        if schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": schedule}
