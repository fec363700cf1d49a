"""The one LightningModule: a network, a task, an optimizer, a schedule and the regularizers.

Lightning hands `training_step` a list of batches (`trainer.steps_per_execution` of them; the data
module groups them) and the module trains on each in turn, with manual optimization: Lightning's
per-batch machinery (hooks, progress, logging) costs a millisecond or more on a CPU, more than a small
network's whole step, and is paid once per list. One training step, in order; each regularizer hook
runs for every selected regularizer, in list order (see regularizers.py):

    transform_batch         augmentation, input noise (training batches only)
    forward                 with weight_perturbation (weight noise) when a regularizer asks for one
    loss                    data loss (label-smoothed when selected) + every penalty
    backward                Lightning's manual_backward (loss scaling under mixed precision, DDP hooks)
    on_before_optimizer_step  the gradient norm is recorded (before clipping), then grad_clip; Lightning
                            calls it from inside optimizer.step, after unscaling the gradients
    optimizer step          the LightningOptimizer's: counts trainer.global_step, skips inf steps under AMP
    on_after_optimizer_step   max_norm
    schedule                an interval=step schedule steps; epoch schedules step at the epoch's end

With one process at plain precision, backward and step are made directly (`_direct_step`): the same
calls, without Lightning's per-step dispatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import SingleDeviceStrategy
from torch.func import functional_call

from dlrun.training.callbacks import Interruption
from dlrun.training.dead_units import DeadUnits
from dlrun.training.optimizers import OptimizerFactory
from dlrun.training.regularizers import Regularizer, sparsity_counts
from dlrun.training.schedulers import Schedule
from dlrun.training.tasks import Task

STAGES = ("train", "val", "test")
# A training batch whose output has at most this many elements is scored at its group's end, with the
# group's other batches: a few operations per group instead of per step (most of a small network's
# overhead). Larger outputs (a language model's logits) are scored at once rather than held, and so are
# those of tasks whose sums are not exact over concatenated batches (Task.scores_groups).
_GROUP_SCORED_NUMEL = 1 << 16

# Training diagnostics, kept as device sums like the task's statistics: metric = numerator / denominator.
DIAGNOSTICS = {
    "penalty": ("penalty", "penalized_steps"),  # mean over the epoch's steps of the summed penalties
    "grad_norm": ("grad_norm", "optimizer_steps"),  # mean global L2 norm of the gradient, before clipping
    "sparsity": ("near_zero", "weights"),  # fraction of penalized weights with |w| < 1e-3, at epoch end
}


class Experiment(pl.LightningModule):
    """Trains `network` on `task`. Logs epoch metrics named `<stage>/<metric>` (train/loss, val/acc, ...).

    Per-batch statistics stay on the device and are reduced (across DDP ranks too) once per epoch: no
    `.item()` per step, which would stall a GPU pipeline. Counts known on the host stay on the host.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        task: Task,
        optimizer: OptimizerFactory | None = None,
        schedule: Schedule | None = None,
        regularizers: Sequence[Regularizer] = (),
        monitor: str = "val/loss",
    ):
        super().__init__()
        self.network = network
        self.task = task
        self.make_optimizer = optimizer  # None: a module that is only evaluated (dlrun-eval)
        self.schedule = schedule
        self.regularizers = list(regularizers)
        self.monitor = monitor
        # Statistics of the stage's epoch so far: device tensors not yet summed (a step's, until the end of
        # its training_step), their running device sums, and host counts.
        self._pending: dict[str, dict[str, list[torch.Tensor]]] = {stage: {} for stage in STAGES}
        self._sums: dict[str, dict[str, torch.Tensor]] = {stage: {} for stage in STAGES}
        self._counts: dict[str, dict[str, float]] = {stage: {} for stage in STAGES}
        # The training group's steps not yet scored: (output, target, mean loss), and per-parameter gradient
        # norms; `_flush` turns both into sums.
        self._unscored: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._grad_norms: list[list[torch.Tensor]] = []
        self._epoch_lr = float("nan")
        self._schedule: dict | None = None  # Schedule.lightning_config's: the scheduler, its interval and monitor
        self.automatic_optimization = False  # training_step steps the optimizer: see the module docstring
        self._direct_steps = False  # set by on_train_start
        self._interruption: Interruption | None = None  # set by on_train_start
        self._network_params = list(network.parameters())
        self._dead_units = DeadUnits(network)  # counts during the validation and test passes only

    def logged_metric_names(self) -> set[str]:
        """Every name this module can log: what callbacks.monitor may watch."""
        per_stage = {f"{stage}/{name}" for stage in ("train", "val") for name in self.task.metric_names}
        evaluated = {f"val/{name}" for name in self.task.eval_metric_names}  # not logged for training
        return per_stage | evaluated | {f"train/{name}" for name in DIAGNOSTICS} | {"lr"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    # --- steps ------------------------------------------------------------------------------------
    def training_step(self, batches, batch_idx):
        """Train on each (x, y) in `batches`; return the data losses, one per step, for DivergenceGuard."""
        optimizer = self.optimizers()
        step = self._direct_step if self._direct_steps else self._lightning_step
        if self.trainer.max_steps >= 0:  # Lightning checks max_steps only between training_step calls
            batches = batches[: max(self.trainer.max_steps - self.trainer.global_step, 0)]
        losses = []
        for x, y in batches:
            if losses and self._interruption is not None and self._interruption.signum is not None:
                break  # a signal: Interruption stops the run after this call; the rest of the group waits
            objective, loss = self.training_objective(x, y)
            optimizer.zero_grad()
            step(objective, optimizer)
            for reg in self.regularizers:
                reg.on_after_optimizer_step(self.network)
            if self._schedule is not None and self._schedule["interval"] == "step":
                self._schedule["scheduler"].step()
            losses.append(loss)
        self._flush("train")
        self._count_logged_steps(len(losses))
        return torch.stack(losses) if losses else None

    def training_objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What one training batch minimizes, and its data loss (detached), the one logged; the batch's
        statistics are recorded."""
        for reg in self.regularizers:
            x, y = reg.transform_batch(x, y)
        output = self._training_forward(x)
        loss = self._score(output, y, "train")
        objective = loss
        if self.task.label_smoothing:  # the objective uses the soft targets; the logged loss does not
            objective = self.task.loss(output, y, smooth=True)
        penalty = self._penalty()
        if penalty is not None:
            self._accumulate("train", {"penalty": penalty, "penalized_steps": 1})
            objective = objective + penalty
        return objective, loss.detach()

    def _lightning_step(self, objective: torch.Tensor, optimizer: LightningOptimizer) -> None:
        """Backward and step through Lightning's strategy and precision plugin (loss scaling, DDP)."""
        self.manual_backward(objective)
        optimizer.step()  # calls on_before_optimizer_step, after unscaling

    def _direct_step(self, objective: torch.Tensor, optimizer: LightningOptimizer) -> None:
        """What _lightning_step does with one process at plain precision, minus Lightning's per-step
        dispatch (strategy -> precision plugin -> closure -> hook loops: ~0.3 ms a step on a CPU core);
        `on_train_start` checks that no callback listens to the hooks that dispatch would call."""
        objective.backward()
        optimizer._on_before_step()  # Lightning's own bookkeeping: trainer.global_step, the profiler
        self.on_before_optimizer_step(optimizer)
        optimizer.optimizer.step()
        optimizer._on_after_step()

    def on_train_start(self) -> None:
        self._network_params = list(self.network.parameters())  # walking the module tree each step costs more
        trainer = self.trainer
        listened = any(
            getattr(type(callback), hook) is not getattr(pl.Callback, hook)
            for callback in trainer.callbacks
            for hook in ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
        )
        self._direct_steps = (
            type(trainer.strategy) is SingleDeviceStrategy and type(trainer.precision_plugin) is Precision
            and not listened
        )
        # With one process a signal ends the group early; DDP ranks stop together, at a call's end (Interruption)
        single = trainer.world_size == 1
        self._interruption = next((c for c in trainer.callbacks if isinstance(c, Interruption) and single), None)

    def _count_logged_steps(self, steps: int) -> None:
        """Loggers label each row with Lightning's count of optimizer steps, which counts one per
        training_step call; make it count the steps taken, so the x axis is the same whatever the grouping."""
        self.trainer.fit_loop.epoch_loop._batches_that_stepped += steps - 1

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self._score(self.network(x), y, "val")

    def test_step(self, batch, batch_idx):
        x, y = batch
        self._score(self.network(x), y, "test")

    def _score(self, output: torch.Tensor, target: torch.Tensor, stage: str) -> torch.Tensor:
        """The batch's data loss; its statistics go to the stage's sums (a small training batch's when its
        group ends, see _GROUP_SCORED_NUMEL)."""
        loss = self.task.loss(output, target)
        scored = (output.detach(), target, loss.detach())
        if stage == "train" and self.task.scores_groups and output.numel() <= _GROUP_SCORED_NUMEL:
            self._unscored.append(scored)
        else:
            self._accumulate(stage, self._stats([scored], stage))
        return loss

    def _stats(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], stage: str) -> dict:
        """The task's sums over (output, target, mean loss) batches, scored as one concatenated batch."""
        # Each batch's loss times its size, in float64: the products are exact, so the epoch's loss sum is
        # the same whatever the grouping. One batch (every evaluation batch) skips the concatenation.
        sizes = [target.numel() for _, target, _ in batches]
        if len(batches) == 1:
            output, target, loss = batches[0]
            loss_sum = loss.to(_sum_dtype(loss.device)) * sizes[0]
        else:
            output, target = (torch.cat([batch[i] for batch in batches]) for i in (0, 1))
            losses = torch.stack([loss for _, _, loss in batches])
            dtype = _sum_dtype(losses.device)
            loss_sum = (losses.to(dtype) * torch.tensor(sizes, dtype=dtype, device=losses.device)).sum()
        stats = self.task.stats(output, target, loss_sum)
        if stage != "train":  # evaluation-only statistics keep the training step's cost unchanged
            stats |= self.task.eval_stats(output, target)
        return stats

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
        grads = [p.grad for p in self._network_params if p.grad is not None]
        if grads:  # each parameter's norm now (before clipping); the step's global norm at the group's end
            self._grad_norms.append(torch._foreach_norm(grads))
        for reg in self.regularizers:
            reg.on_before_optimizer_step(self.network)

    # --- epoch metrics ----------------------------------------------------------------------------
    def _accumulate(self, stage: str, stats: dict[str, torch.Tensor | float]) -> None:
        """Record a batch's statistics: tensors wait for `_flush`, plain numbers are summed at once."""
        pending, counts = self._pending[stage], self._counts[stage]
        for key, value in stats.items():
            if isinstance(value, torch.Tensor):
                pending.setdefault(key, []).append(value.detach())
            else:
                counts[key] = counts.get(key, 0) + value

    def _flush(self, stage: str) -> None:
        """Score the training group's batches, then add the pending tensors to the running sums: a few
        operations per key, not per batch."""
        if stage == "train":
            if self._unscored:
                self._accumulate("train", self._stats(self._unscored, "train"))
                self._unscored = []
            if self._grad_norms:
                self._accumulate("train", _global_grad_norms(self._grad_norms))
                self._grad_norms = []
        sums = self._sums[stage]
        for key, values in self._pending[stage].items():
            total = torch.stack(values).to(_sum_dtype(values[0].device)).sum(0)
            sums[key] = sums[key] + total if key in sums else total
        self._pending[stage] = {}

    def _epoch_metrics(self, stage: str) -> dict[str, float]:
        self._flush(stage)
        sums, counts = self._sums[stage], self._counts[stage]
        self._sums[stage], self._counts[stage] = {}, {}
        if not sums and not counts:
            return {}
        device = next(iter(sums.values())).device if sums else self.device
        # Scalar and vector sums (per-class counts) in one flat tensor: one all-reduce, one host sync.
        flat = torch.cat([
            *(sums[k].reshape(-1) for k in sorted(sums)),
            torch.tensor([float(counts[k]) for k in sorted(counts)], dtype=_sum_dtype(device), device=device),
        ])
        flat = self.trainer.strategy.reduce(flat, reduce_op="sum") if self.trainer.world_size > 1 else flat
        values = flat.tolist()  # the one host sync per epoch
        totals, start = {}, 0
        for key in sorted(sums):  # split back: a float per scalar sum, a list per vector sum
            size = sums[key].numel()
            totals[key] = values[start : start + size] if sums[key].dim() else values[start]
            start += size
        totals |= dict(zip(sorted(counts), values[start:], strict=True))
        metrics = self.task.metrics(totals)
        for name, (numerator, denominator) in DIAGNOSTICS.items():
            if numerator in totals:
                metrics[name] = totals[numerator] / max(totals[denominator], 1.0)
        return {f"{stage}/{name}": value for name, value in metrics.items()}

    def _log_stage(self, stage: str) -> None:
        metrics = self._epoch_metrics(stage)
        active = self._dead_units.stop()
        if metrics and active is not None:
            if self.trainer.world_size > 1:  # a unit lives if a sample on any rank made it positive
                active = self.trainer.strategy.reduce(active.float(), reduce_op="sum")
            metrics[f"{stage}/dead_relu"] = float((active == 0).float().mean())
        if metrics and not self.trainer.sanity_checking:
            self.log_dict(metrics, on_epoch=True, sync_dist=False)  # already reduced across ranks

    def on_train_epoch_start(self) -> None:
        # Read here, not at the epoch's end: Lightning steps epoch-interval schedules right after the last
        # training batch, so by then the optimizer already holds the next epoch's rate.
        self._epoch_lr = self.optimizers().param_groups[0]["lr"]

    def on_train_epoch_end(self) -> None:
        if self._counts["train"]:  # some training step ran this epoch
            self._accumulate("train", sparsity_counts(self.network))
        metrics = self._epoch_metrics("train")
        metrics["lr"] = self._epoch_lr  # the rate the epoch trained with (its first step's, interval=step)
        self.log_dict(metrics, on_epoch=True, sync_dist=False)
        if self._schedule is not None and self._schedule["interval"] == "epoch":
            self._step_epoch_schedule(metrics)

    def on_validation_epoch_start(self) -> None:
        self._dead_units.start()

    def on_validation_epoch_end(self) -> None:
        self._log_stage("val")

    def on_test_epoch_start(self) -> None:
        self._dead_units.start()

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


def _global_grad_norms(per_parameter: list[list[torch.Tensor]]) -> dict[str, torch.Tensor | int]:
    """The summed global L2 gradient norms of steps, from each step's per-parameter norms (as
    torch.nn.utils.get_total_norm computes them), in one reduction when every step had the same gradients."""
    if len({len(norms) for norms in per_parameter}) == 1:
        rows = torch.stack([norm for norms in per_parameter for norm in norms]).view(len(per_parameter), -1)
        per_step = torch.linalg.vector_norm(rows, dim=1)
    else:
        per_step = torch.stack([torch.linalg.vector_norm(torch.stack(norms)) for norms in per_parameter])
    return {"grad_norm": per_step.sum(), "optimizer_steps": len(per_parameter)}


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 keeps long sums exact; Apple's MPS has no float64, so it sums in float32."""
    return torch.float32 if device.type == "mps" else torch.float64
