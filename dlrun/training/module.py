"""The one LightningModule: a network, a task, an optimizer, a schedule and the regularizers.

A training step, in order; each regularizer hook runs for every selected regularizer, in list order
(see regularizers.py):

    transform_batch         augmentation, input noise (training batches only)
    forward                 with weight_perturbation (weight noise) when a regularizer asks for one
    loss                    data loss (label-smoothed when selected) + every penalty
    backward                Lightning
    on_before_optimizer_step  the gradient norm is recorded (before clipping), then grad_clip
    optimizer step          Lightning; the schedule steps per epoch or per step (schedulers.py)
    on_after_optimizer_step   max_norm
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.func import functional_call

from dlrun.training.optimizers import build_optimizer
from dlrun.training.regularizers import Regularizer, sparsity_counts
from dlrun.training.schedulers import build_scheduler
from dlrun.training.tasks import Task

STAGES = ("train", "val", "test")

# Training diagnostics, kept as device sums like the task's statistics: metric = numerator / denominator.
DIAGNOSTICS = {
    "penalty": ("penalty", "penalized_steps"),  # mean over the epoch's steps of the summed penalties
    "grad_norm": ("grad_norm", "optimizer_steps"),  # mean global L2 norm of the gradient, before clipping
    "sparsity": ("near_zero", "weights"),  # fraction of penalized weights with |w| < 1e-3, at epoch end
}


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
        self._epoch_lr = float("nan")

    def logged_metric_names(self) -> set[str]:
        """Every name this module can log: what callbacks.monitor may watch."""
        per_stage = {f"{stage}/{name}" for stage in ("train", "val") for name in self.task.metric_names}
        return per_stage | {f"train/{name}" for name in DIAGNOSTICS} | {"lr"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    # --- steps ------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, y = batch
        for reg in self.regularizers:
            x, y = reg.transform_batch(x, y)
        output = self._training_forward(x)
        loss = self._score(output, y, "train")
        if self.task.label_smoothing:  # the objective uses the soft targets; the logged loss does not
            loss = self.task.loss(output, y, smooth=True)
        penalty = self._penalty()
        if penalty is None:
            return loss
        self._accumulate("train", {"penalty": penalty, "penalized_steps": torch.ones((), device=loss.device)})
        return loss + penalty

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self._score(self.network(x), y, "val")

    def test_step(self, batch, batch_idx):
        x, y = batch
        self._score(self.network(x), y, "test")

    def _score(self, output: torch.Tensor, target: torch.Tensor, stage: str) -> torch.Tensor:
        """The batch's data loss, its statistics added to the stage's sums."""
        loss = self.task.loss(output, target)
        self._accumulate(stage, self.task.stats(output.detach(), target, loss.detach()))
        return loss

    def _training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output, at parameters perturbed for this pass when a regularizer asks (weight noise).

        `functional_call` swaps in w + delta for the pass only: gradients flow to w, nothing needs undoing.
        """
        deltas: dict[str, torch.Tensor] = {}
        for reg in self.regularizers:
            for name, delta in reg.weight_perturbation(self.network).items():
                deltas[name] = deltas[name] + delta if name in deltas else delta
        if not deltas:
            return self.network(x)
        params = dict(self.network.named_parameters())
        return functional_call(self.network, {name: params[name] + d for name, d in deltas.items()}, (x,))

    def _penalty(self) -> torch.Tensor | None:
        terms = [t for t in (r.penalty(self.network) for r in self.regularizers) if t is not None]
        return torch.stack(terms).sum() if terms else None

    # --- around the optimizer step ------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradients are final here (accumulated, all-reduced, unscaled under mixed precision)."""
        grads = [p.grad for p in self.network.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            self._accumulate("train", {"grad_norm": norm, "optimizer_steps": torch.ones((), device=norm.device)})
        for reg in self.regularizers:
            reg.on_before_optimizer_step(self.network)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for reg in self.regularizers:
            reg.on_after_optimizer_step(self.network)

    # --- epoch metrics ----------------------------------------------------------------------------
    def _accumulate(self, stage: str, stats: dict[str, torch.Tensor]) -> None:
        sums = self._sums[stage]
        for key, value in stats.items():
            # float64 keeps long sums exact; Apple's MPS has no float64, so it sums in float32
            value = value.detach().to(torch.float32 if value.device.type == "mps" else torch.float64)
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
        for name, (numerator, denominator) in DIAGNOSTICS.items():
            if numerator in totals:
                metrics[name] = totals[numerator] / max(totals[denominator], 1.0)
        return {f"{stage}/{name}": value for name, value in metrics.items()}

    def _log_stage(self, stage: str) -> None:
        metrics = self._epoch_metrics(stage)
        if metrics and not self.trainer.sanity_checking:
            self.log_dict(metrics, on_epoch=True, sync_dist=False)  # already reduced across ranks

    def on_train_epoch_start(self) -> None:
        # Read here, not at the epoch's end: Lightning steps epoch-interval schedules right after the last
        # training batch, so by then the optimizer already holds the next epoch's rate.
        self._epoch_lr = self.optimizers().param_groups[0]["lr"]

    def on_train_epoch_end(self) -> None:
        if self._sums["train"]:  # some training step ran this epoch
            self._accumulate("train", sparsity_counts(self.network))
        metrics = self._epoch_metrics("train")
        metrics["lr"] = self._epoch_lr  # the rate the epoch trained with (its first step's, interval=step)
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
