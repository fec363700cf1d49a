"""Grouped execution: how training batches reach the optimizer. The one file that touches Lightning's private API.

Two settings of the trainer group live here, not in Lightning's Trainer:

- `trainer.steps_per_execution`: training batches per Lightning `training_step` call. Lightning's per-call
  machinery (hooks, progress, logging) costs a millisecond or more on a CPU, more than a small network's
  whole step; `GroupedBatches` hands the epoch's batches to Lightning in `Group`s, and
  `Experiment.training_step` trains on each batch of a group in turn (manual optimization).
- `trainer.accumulate_grad_batches=k`: one optimizer step per k batches (micro-batches). Each micro-batch's
  objective is divided by the size of its accumulation window before backward, so the summed gradient is
  that of the window's mean loss: k micro-batches of b samples step like one batch of k*b under a mean loss.
  An epoch whose batch count is not a multiple of k ends with a shorter window that still steps, divided by
  its own size. Under DDP only a window's last backward all-reduces the gradients.

`trainer.global_step`, step schedules, the loggers' step count and the progress bar count optimizer steps;
`trainer.limit_train_batches` counts batches (Lightning's own limit would count groups). With one process
at plain precision, backward and step are made directly (`direct_steps`): the same calls as Lightning's
path, without its per-step dispatch.

Every use of Lightning's private API is in this file, each checked by tests/test_grouping.py, so that a
Lightning upgrade that changes one fails there, loudly, rather than changing numbers somewhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import SingleDeviceStrategy

from dlrun.errors import UserError

# trainer.steps_per_execution=auto on one device: Lightning's per-step overhead (~1-3 ms on a CPU core)
# paid once per 16 steps is a few percent of even the smallest network's step (see benchmarks/).
AUTO_STEPS_PER_EXECUTION = 16

# Hooks that Lightning's step dispatch calls on callbacks; a callback on any of them turns direct steps off.
_DISPATCHED_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


class Group:
    """The training batches one `training_step` call trains on, in order, drawn from the loader as the call
    reaches them.

    Lightning fetches the next call's batch before it runs the current call. A group drawn whole at that point
    would hold training up while a streaming loader's workers made all of its batches, then leave the workers
    idle (past their prefetch) while it trained; drawn batch by batch, loading overlaps training as in a plain
    loop. Drawn batches are kept, so the hooks after the call see them; a group drawn later than the one
    before it first draws that one's rest, so every group holds its own batches whatever the order of use.
    """

    def __init__(self, batches: Iterator, size: int, before: Group | None = None):
        self._batches, self._size, self._before = batches, size, before
        self._drawn: list = []
        self._prepare: list[Callable[[Any], Any]] = []

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self._size:
            raise IndexError(i)
        if self._before is not None:
            self._before.draw_all()
            self._before = None
        while len(self._drawn) <= i:
            batch = next(self._batches)
            for prepare in self._prepare:
                batch = prepare(batch)
            self._drawn.append(batch)
        return self._drawn[i]

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(self._size))

    def draw_all(self) -> None:
        if self._size:
            self[self._size - 1]

    def each(self, prepare: Callable[[Any], Any]) -> Group:
        """Apply `prepare` to every batch as it is drawn (and to those drawn already): the move to the device."""
        self._drawn = [prepare(batch) for batch in self._drawn]
        self._prepare.append(prepare)
        return self


class GroupedBatches:
    """Any sized training loader's (x, y) batches, in `Group`s of up to `size`, at most `limit` batches an
    epoch: a number of batches (int) or a fraction of them (float, at least one batch unless it is 0)."""

    def __init__(self, loader: Iterable, size: int, limit: int | float = 1.0):
        self.loader, self.size, self.limit = loader, size, limit

    def n_batches(self) -> int:
        """Training batches per epoch (on this rank), after the limit."""
        batches = len(self.loader)
        if isinstance(self.limit, float):
            return max(int(batches * self.limit), 1) if self.limit > 0 and batches else 0
        return min(batches, self.limit)

    def __len__(self) -> int:
        return -(-self.n_batches() // self.size)

    def __iter__(self) -> Iterator[Group]:
        batches, n, group = iter(self.loader), self.n_batches(), None
        for start in range(0, n, self.size):
            group = Group(batches, min(self.size, n - start), group)
            yield group


class GroupedExecution(pl.Callback):
    """Groups the data module's training batches and makes the optimizer steps of `Experiment.training_step`.

    `build_trainer` takes the settings out of Lightning's Trainer arguments (`from_trainer_args`), adds this
    callback and resolves it for the trainer's world size. A Trainer without it trains one batch per call
    and steps after every batch (Experiment asks `for_training`).
    """

    def __init__(self, steps_per_execution: int | str = 1, accumulate_grad_batches: int = 1,
                 limit_train_batches: int | float = 1.0):
        self.steps_per_execution = steps_per_execution
        self.accumulate_grad_batches = accumulate_grad_batches
        self.limit_train_batches = limit_train_batches
        self.direct_steps = False  # decided when training starts, see for_training
        # accumulation: this epoch's training batches, how many have been backpropagated, the losses of the
        # window in progress (a window may span training_step calls)
        self._epoch_batches = 0
        self._position = 0
        self._window_losses: list[torch.Tensor] = []

    # --- settings -------------------------------------------------------------------------------
    @classmethod
    def from_trainer_args(cls, trainer_args: dict[str, Any]) -> GroupedExecution:
        """Take this file's settings out of the trainer group's keyword arguments; Lightning keeps only
        whether to train at all (limit_train_batches 0 or 1.0)."""
        limit = trainer_args.pop("limit_train_batches", 1.0)
        execution = cls(
            trainer_args.pop("steps_per_execution", "auto"),  # both absent from older runs' configs
            trainer_args.pop("accumulate_grad_batches", 1),
            limit,
        )
        trainer_args["limit_train_batches"] = limit if limit == 0 else 1.0
        return execution

    def resolve(self, world_size: int) -> GroupedExecution:
        """Settle `auto`: 16 batches per call on one device, 1 under DDP, where more are refused: the
        gradient all-reduce is armed once per call of the DDP-wrapped module, so a second step in the call
        would not sync."""
        setting = self.steps_per_execution
        if setting == "auto":
            self.steps_per_execution = AUTO_STEPS_PER_EXECUTION if world_size == 1 else 1
        elif setting > 1 and world_size > 1:
            raise UserError(
                f"trainer.steps_per_execution = {setting}: DDP ({world_size} processes) needs 1 step per execution",
                "Leave it at auto (1 under DDP, more on one device).",
            )
        return self

    @classmethod
    def for_training(cls, trainer: pl.Trainer) -> GroupedExecution:
        """The trainer's GroupedExecution (a default one if it has none), with the step path decided: direct
        steps with one process at plain precision and no callback on the hooks Lightning's dispatch calls."""
        execution = next((c for c in trainer.callbacks if isinstance(c, cls)), None) or cls()
        listened = any(
            getattr(type(callback), hook) is not getattr(pl.Callback, hook)
            for callback in trainer.callbacks
            for hook in _DISPATCHED_HOOKS
        )
        execution.direct_steps = (
            type(trainer.strategy) is SingleDeviceStrategy and type(trainer.precision_plugin) is Precision
            and not listened
        )
        return execution

    # --- the training loader --------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Lightning asks the data module for its training loader after this hook: make it ask through us.
        The data module knows nothing of groups; its loader may be anything sized that yields (x, y)."""
        datamodule = trainer.datamodule
        if stage == "fit" and datamodule is not None:
            loader_of = type(datamodule).train_dataloader.__get__(datamodule)  # the class's: fit may run twice
            datamodule.train_dataloader = lambda: GroupedBatches(
                loader_of(), self.steps_per_execution, self.limit_train_batches
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        grouped = isinstance(loader, GroupedBatches)
        self._epoch_batches = loader.n_batches() if grouped else trainer.num_training_batches
        self._position = 0
        self._sync_gradients(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        model = self._accumulating_ddp(trainer)
        if model is not None:  # broadcast buffers (batch norm's) before every forward, as DDP does without
            model.require_forward_param_sync = True  # accumulation: _sync_gradients' flag turned it off

    # --- one training batch -----------------------------------------------------------------------
    @staticmethod
    def batches_of(batch: Group | Any) -> list:
        """The training batches of one `training_step` call: a Group, or one batch without this callback."""
        return batch if isinstance(batch, Group) else [batch]

    @staticmethod
    def max_steps_reached(trainer: pl.Trainer) -> bool:
        """Lightning checks max_steps only between training_step calls; a group checks before each batch."""
        return 0 <= trainer.max_steps <= trainer.global_step

    def backward(self, module: pl.LightningModule, objective: torch.Tensor, loss: torch.Tensor,
                 optimizer: LightningOptimizer) -> torch.Tensor | None:
        """Backpropagate one batch's objective into the accumulated gradients. At the end of an accumulation
        window (every batch when k = 1) return the window's data loss, the mean of its batches' `loss`: the
        caller then calls `step`. Otherwise None."""
        k = self.accumulate_grad_batches
        if k == 1:
            optimizer.zero_grad()
            self._backward(module, objective)
            return loss
        start = self._position - self._position % k
        window = min(k, self._epoch_batches - start)
        if self._position == start:
            optimizer.zero_grad()
            self._window_losses = []
        self._backward(module, objective / window if window > 1 else objective)
        self._window_losses.append(loss)
        self._position += 1
        self._sync_gradients(module.trainer)
        if self._position < start + window:
            return None
        return torch.stack(self._window_losses).mean()

    def _backward(self, module: pl.LightningModule, objective: torch.Tensor) -> None:
        if self.direct_steps:
            objective.backward()
        else:
            module.manual_backward(objective)  # loss scaling under mixed precision, DDP's all-reduce

    def step(self, module: pl.LightningModule, optimizer: LightningOptimizer) -> None:
        """The optimizer step: through Lightning's strategy and precision plugin (which call
        on_before_optimizer_step after unscaling), or directly, with Lightning's own bookkeeping
        (trainer.global_step, the profiler) around it: ~0.3 ms a step less on a CPU core."""
        if not self.direct_steps:
            optimizer.step()
            return
        optimizer._on_before_step()
        module.on_before_optimizer_step(optimizer)
        optimizer.optimizer.step()
        optimizer._on_after_step()

    def _sync_gradients(self, trainer: pl.Trainer) -> None:
        """Under DDP with accumulation, arm the gradient all-reduce only for a window's last backward.

        The all-reduce of a backward is armed twice in Lightning's manual optimization: when Lightning's
        manual_backward starts, and when the DDP-wrapped module's forward (one training_step call) ends,
        for the next call's backward. So the flag that `no_sync` would clear for one block must say, at all
        times, whether the next backward ends a window.
        """
        model = self._accumulating_ddp(trainer)
        if model is not None:
            start = self._position - self._position % self.accumulate_grad_batches
            last = min(start + self.accumulate_grad_batches, self._epoch_batches) - 1
            model.require_backward_grad_sync = self._position == last

    def _accumulating_ddp(self, trainer: pl.Trainer) -> torch.nn.parallel.DistributedDataParallel | None:
        model = trainer.strategy.model
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        return model if ddp and self.accumulate_grad_batches > 1 else None

    @staticmethod
    def count_logged_steps(trainer: pl.Trainer, steps: int) -> None:
        """Loggers label each row with Lightning's count of optimizer steps, which counts one per training_step
        call; make it count the optimizer steps taken, so the x axis is the same whatever the grouping."""
        trainer.fit_loop.epoch_loop._batches_that_stepped += steps - 1


def optimizer_steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps per training epoch (what the progress bar counts to); None if not grouped here."""
    loader = trainer.train_dataloader
    if not isinstance(loader, GroupedBatches):
        return None
    k = next((c.accumulate_grad_batches for c in trainer.callbacks if isinstance(c, GroupedExecution)), 1)
    return -(-loader.n_batches() // k)


def restart_epoch_progress(trainer: pl.Trainer) -> None:
    """Make a checkpoint taken in on_train_epoch_start read "epoch N, no batch yet", not "epoch N-1's
    batches all done" (which Lightning would restart by skipping epoch N): the epoch loop resets its
    per-epoch progress right after that hook; this resets it first."""
    loop = trainer.fit_loop.epoch_loop
    for progress in (loop.batch_progress, loop.scheduler_progress, loop.automatic_optimization.optim_progress,
                     loop.manual_optimization.optim_step_progress, loop.val_loop.batch_progress):
        progress.reset_on_run()
    loop.val_loop.batch_progress.total.reset()
