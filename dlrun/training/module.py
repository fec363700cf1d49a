"""The one LightningModule: a network, a task, an optimizer, a schedule and the regularizers.

Lightning hands `training_step` a group of batches (`trainer.steps_per_execution` of them) and the
module trains on each in turn, with manual optimization: Lightning's per-batch machinery (hooks,
progress, logging) costs a millisecond or more on a CPU, more than a small network's whole step, and is
paid once per group. dlrun/training/grouping.py groups the batches and makes backward and the optimizer
step, one per `trainer.accumulate_grad_batches` batches. One training batch, in order; each regularizer
hook runs for every selected regularizer, in list order (see regularizers.py):

    transform_batch         augmentation, input noise (training batches only)
    forward                 with weight_perturbation (weight noise) when a regularizer asks for one
    loss                    the task's objective (the data loss, label-smoothed when selected; an input task's
                            model adds its own penalty) + every regularizer's penalty
    backward                Lightning's manual_backward (loss scaling under mixed precision, DDP hooks),
                            or directly (grouping.py); gradients add up over an accumulation window
and at the window's end (every batch unless gradients are accumulated):
    on_before_optimizer_step  the gradient norm is recorded (before clipping), then grad_clip; Lightning
                            calls it from inside optimizer.step, after unscaling the gradients
    optimizer step          the LightningOptimizer's: counts trainer.global_step, skips inf steps under AMP
    on_after_optimizer_step   max_norm
    schedule                an interval=step schedule steps; epoch schedules step at the epoch's end
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from torch.func import functional_call

from dlrun.metrics import LEARNING_RATE, TRAIN_EVAL
from dlrun.training.callbacks import Interruption
from dlrun.training.grouping import GroupedExecution
from dlrun.training.metrics import EpochMetrics
from dlrun.training.optimizers import OptimizerFactory
from dlrun.training.regularizers import Regularizer
from dlrun.training.schedulers import Schedule
from dlrun.training.tasks import Task

#: the stage each split the validation loop measures logs as (the data module's `validation_splits`)
VALIDATION_STAGES = {"val": "val", "train": TRAIN_EVAL}


class Experiment(pl.LightningModule):
    """Trains `network` on `task`. Logs epoch metrics named `<stage>/<metric>` (train/loss, val/acc, ...):
    `self.metrics` (dlrun/training/metrics.py) keeps their sums on the device and reduces them (across DDP
    ranks too) once per epoch: no `.item()` per step, which would stall a GPU pipeline.

    `validation_splits` are the data module's: the validation loop's loaders, in order (`val`, and `train`
    with trainer.train_eval, logged as train_eval/*; none with dataset.val_fraction=0).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        task: Task,
        optimizer: OptimizerFactory | None = None,
        schedule: Schedule | None = None,
        regularizers: Sequence[Regularizer] = (),
        monitor: str = "val/loss",
        validation_splits: Sequence[str] = ("val",),
    ):
        super().__init__()
        self.network = network
        self.task = task
        self.make_optimizer = optimizer  # None: a module that is only evaluated (dlrun-eval)
        self.schedule = schedule
        self.regularizers = list(regularizers)
        self.monitor = monitor
        self.validation_stages = tuple(VALIDATION_STAGES[split] for split in validation_splits)
        self.metrics = EpochMetrics(task, network)
        self._epoch_lr = float("nan")
        self._schedule: dict | None = None  # Schedule.lightning_config's: the scheduler, its interval and monitor
        self.automatic_optimization = False  # training_step steps the optimizer: see the module docstring
        self._execution = GroupedExecution()  # the trainer's, from on_train_start
        self._interruption: Interruption | None = None  # set by on_train_start
        self._network_params = list(network.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    # --- steps ------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        """Train on each (x, y) of the call's batches; return the data loss of each optimizer step taken (the
        mean over its accumulated batches), for DivergenceGuard."""
        optimizer, execution = self.optimizers(), self._execution
        losses = []
        for i, (x, y) in enumerate(execution.batches_of(batch)):
            if i and self._interruption is not None and self._interruption.signum is not None:
                break  # a signal: Interruption stops the run after this call; the rest of the group waits
            if execution.max_steps_reached(self.trainer):
                break
            objective, loss = self.training_objective(x, y)
            step_loss = execution.backward(self, objective, loss, optimizer)
            if step_loss is None:  # accumulating gradients: no optimizer step yet
                continue
            execution.step(self, optimizer)
            for reg in self.regularizers:
                reg.on_after_optimizer_step(self.network)
            if self._schedule is not None and self._schedule["interval"] == "step":
                self._schedule["scheduler"].step()
            losses.append(step_loss)
        self.metrics.flush("train")
        execution.count_logged_steps(self.trainer, len(losses))
        return torch.stack(losses) if losses else None

    def training_objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What one training batch minimizes, and its data loss (detached), the one logged; the batch's
        statistics are recorded."""
        for reg in self.regularizers:
            x, y = reg.transform_batch(x, y)
        target = self.task.target(x, y)
        output = self._training_forward(x)
        loss = self.metrics.score(output, target, "train")
        objective = self.task.objective(output, target, loss)  # label smoothing, a model's own penalty
        penalty = self._penalty()
        if penalty is not None:
            self.metrics.add_penalty(penalty)
            objective = objective + penalty
        return objective, loss.detach()

    def on_train_start(self) -> None:
        self._network_params = list(self.network.parameters())  # walking the module tree each step costs more
        trainer = self.trainer
        self._execution = GroupedExecution.for_training(trainer)
        # With one process a signal ends the group early; DDP ranks stop together, at a call's end (Interruption)
        single = trainer.world_size == 1
        self._interruption = next((c for c in trainer.callbacks if isinstance(c, Interruption) and single), None)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        stage = self.validation_stages[dataloader_idx]
        self.metrics.evaluating(stage)
        self.metrics.score(self.network(x), self.task.target(x, y), stage)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.metrics.score(self.network(x), self.task.target(x, y), "test")

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
        """Gradients are final here (all-reduced, unscaled under mixed precision)."""
        self.metrics.add_gradient_norms(self._network_params)  # before clipping
        for reg in self.regularizers:
            reg.on_before_optimizer_step(self.network)

    # --- epoch metrics ----------------------------------------------------------------------------
    def _epoch_metrics(self, stage: str) -> dict[str, float]:
        strategy = self.trainer.strategy
        reduce = (lambda flat: strategy.reduce(flat, reduce_op="sum")) if self.trainer.world_size > 1 else None
        return self.metrics.compute(stage, reduce)

    def _log_stage(self, stage: str) -> None:
        metrics = self._epoch_metrics(stage)
        if metrics and not self.trainer.sanity_checking:
            self.log_dict(metrics, on_epoch=True, sync_dist=False)  # already reduced across ranks

    def on_train_epoch_start(self) -> None:
        # Read here, not at the epoch's end: Lightning steps epoch-interval schedules right after the last
        # training batch, so by then the optimizer already holds the next epoch's rate.
        self._epoch_lr = self.optimizers().param_groups[0]["lr"]

    def on_train_epoch_end(self) -> None:
        metrics = self._epoch_metrics("train")
        metrics[LEARNING_RATE] = self._epoch_lr  # the rate the epoch trained with (its first step's, interval=step)
        self.log_dict(metrics, on_epoch=True, sync_dist=False)
        if self._schedule is not None and self._schedule["interval"] == "epoch":
            self._step_epoch_schedule(metrics)

    def on_validation_epoch_start(self) -> None:
        self.metrics.start_evaluation()

    def on_validation_epoch_end(self) -> None:
        for stage in self.validation_stages:
            self._log_stage(stage)

    def on_test_epoch_start(self) -> None:
        self.metrics.start_evaluation()

    def on_test_epoch_end(self) -> None:
        self._log_stage("test")

    # --- optimization -----------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.make_optimizer is None:
            raise RuntimeError("this Experiment was built to be evaluated: it has no optimizer to train with")
        optimizer = self.make_optimizer(self.network.parameters())
        self._schedule = self.schedule and self.schedule.lightning_config(optimizer, self.monitor)
        if self._schedule is None:
            return optimizer
        # Lightning keeps the schedule's state in checkpoints; dlrun steps it (manual optimization)
        return {"optimizer": optimizer, "lr_scheduler": self._schedule["scheduler"]}

    def _step_epoch_schedule(self, train_metrics: dict[str, float]) -> None:
        """After the epoch's validation; a plateau schedule reads the monitored metric, as Lightning's would."""
        scheduler = self._schedule["scheduler"]
        if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()
            return
        monitor = self._schedule["monitor"]
        value = train_metrics.get(monitor, self.trainer.callback_metrics.get(monitor))
        if value is None:
            raise MisconfigurationException(
                f"scheduler=plateau watches {monitor!r}, which was not logged this epoch "
                f"(logged: {', '.join(sorted(self.trainer.callback_metrics))})"
            )
        scheduler.step(float(value))

