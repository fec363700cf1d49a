"""Callbacks from the `callbacks` group: early stopping, checkpoints, progress, the monitor's history,
and what makes a run survive: a resumable `last` checkpoint, clean stops on signals, divergence stops.

Each entry of the group with a `_target_` (conf/callbacks/default.yaml: early_stopping, checkpoint,
divergence, and any a user adds in an option of their own) is built by `instantiate_callbacks`. Built
in code instead are what the run's own bookkeeping needs whatever the config says: MonitorTracker
(summary.json's best value and epoch), Interruption (clean stops on signals), FirstStepClock
(summary.json's startup time), and ResumeCheckpoint's state, which `checkpoints` adds beside
`best.ckpt` with `save_last`; `progress_bar` and `model_summary` stay switches of Lightning's display.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    ModelCheckpoint,
    RichModelSummary,
    RichProgressBar,
)

from dlrun.errors import UserError
from dlrun.rundir import RunDir, RunInterrupted
from dlrun.training.grouping import optimizer_steps_per_epoch, restart_epoch_progress

log = logging.getLogger("dlrun")


class MonitorTracker(Checkpoint):
    """Remembers the best value of the monitored metric, the epoch it was reached and that epoch's
    metrics (the model best.ckpt holds), and the last epoch's metrics: what summary.json reports.

    A `Checkpoint` subclass only so that Lightning calls it where it calls ModelCheckpoint: after the
    LightningModule has logged the epoch's training metrics, so a train/* monitor is current. Its state
    is plain floats, saved in checkpoints (a resumed run keeps its best epoch's metrics).
    """

    def __init__(self, monitor: str | None, mode: str):
        self.monitor = monitor
        self.mode = mode
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.last_epoch: int | None = None
        self.last_metrics: dict[str, float] = {}

    def _check(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking:
            return
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("test/")}
        self.last_epoch, self.last_metrics = trainer.current_epoch, logged
        if self.monitor is None:  # nothing monitored (no validation): the last epoch is the one kept
            self.best_epoch, self.best_metrics = trainer.current_epoch, logged
            return
        value = logged.get(self.monitor)
        if value is None or math.isnan(value):
            return
        better = self.best_value is None or (value < self.best_value if self.mode == "min" else value > self.best_value)
        if better:
            self.best_value, self.best_epoch, self.best_metrics = value, trainer.current_epoch, logged

    def on_train_epoch_end(self, trainer, pl_module):
        self._check(trainer)

    def state_dict(self):
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "best_metrics": dict(self.best_metrics),
                "last_epoch": self.last_epoch, "last_metrics": dict(self.last_metrics)}

    def load_state_dict(self, state_dict):
        self.best_value = state_dict.get("best_value")
        self.best_epoch = state_dict.get("best_epoch")
        self.best_metrics = dict(state_dict.get("best_metrics", {}))  # absent from older checkpoints
        self.last_epoch = state_dict.get("last_epoch")
        self.last_metrics = dict(state_dict.get("last_metrics", {}))


class ResumeCheckpoint(Callback):
    """Writes `last.ckpt` at the start of every epoch and when training ends, with the random state.

    At an epoch's start everything of the previous epoch is settled (scheduler stepped, early
    stopping and the tracker updated, metrics logged), so a run resumed from here replays exactly
    what the uninterrupted run would have done; Lightning restarts such a checkpoint at the epoch's
    start. An interruption loses at most the epoch in progress. The random state (torch, CUDA,
    numpy, Python) is this callback's state, saved with the checkpoint as plain tensors and tuples
    so that the checkpoint loads with `weights_only=True`.
    """

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.checkpoint("last")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restart_epoch_progress(trainer)  # so that the checkpoint reads "epoch N, no batch yet"
        trainer.save_checkpoint(self.path, weights_only=False)  # said, not defaulted: resume needs the optimizer

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        np_state = state_dict["numpy"]
        np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached"]))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class Interruption(Callback):
    """Turns Ctrl-C, SIGTERM and SIGUSR1 (SLURM's warning before preemption) into a clean stop.

    The handler only records the signal; the run stops at the next batch boundary by raising
    RunInterrupted (Experiment cuts its group of batches short for it), so no step or file write is
    cut in half. A second Ctrl-C stops at once. Under
    DDP the ranks agree on stopping (one boolean all-reduce per training batch), because a rank
    that left alone would hang the others' gradient all-reduce.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextmanager
    def catching(self) -> Iterator[None]:
        """Install the handlers for the duration of the block (main thread only: Python's rule)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
        self.signum = signum
        log.warning("received %s: stopping after this batch", signal.Signals(signum).name)

    def _check(self, trainer: pl.Trainer, collective: bool) -> None:
        stop = self.signum is not None
        if collective and trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            raise RunInterrupted(self.signum or signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._check(trainer, collective=True)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.world_size == 1:  # ranks may hold different numbers of validation batches
            self._check(trainer, collective=False)


class Diverged(Exception):
    """The training loss became NaN or infinite, or exploded: a result of the run, not a bug."""

    def __init__(self, step: int, epoch: int, loss: float, reason: str):
        super().__init__(f"diverged at step {step} (epoch {epoch}): {reason}")
        self.step, self.epoch, self.loss, self.reason = step, epoch, loss, reason

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "loss": str(self.loss), "reason": self.reason}


class DivergenceGuard(Callback):
    """Stops training when a step's loss is NaN/inf or exceeds `factor` x the first step's loss.

    The training step returns its loss, or the losses of the steps it took (Experiment trains on a list
    of batches per call). They stay on the device (no host sync per step) and are read every
    `check_every` steps and at the last batch of every epoch, before validation, so a diverged run
    stops within the epoch it diverged in. By default that is every 50 steps on an accelerator, and
    at every training_step call on the CPU, where reading costs nothing. The step reported is the
    first bad one, counted from 0 over the whole run (trainer.global_step before it).
    """

    def __init__(self, factor: float | None, check_every: int | None = None):
        self.factor = factor
        self.check_every = check_every
        self.initial_loss: float | None = None
        self._pending: list[tuple[int, torch.Tensor]] = []  # (the first step's number, the losses from there)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() == 0:
            return
        losses = loss.detach().reshape(-1)
        if self.initial_loss is None:
            self.initial_loss = float(losses[0])  # one host sync, once per run
        self._pending.append((trainer.global_step - len(losses), losses))
        every = self.check_every or (1 if losses.device.type == "cpu" else 50)
        pending = sum(len(losses) for _, losses in self._pending)
        if pending >= every or batch_idx + 1 >= trainer.num_training_batches:
            self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        steps = [first + i for first, losses in self._pending for i in range(len(losses))]
        losses = torch.cat([losses.float() for _, losses in self._pending]).cpu()  # the sync
        self._pending = []
        limit = self.factor * abs(self.initial_loss) if self.factor and self.initial_loss else math.inf
        bad = ~torch.isfinite(losses) | (losses.abs() > limit)
        first = int(bad.nonzero()[0, 0]) if bool(bad.any()) else None
        stop = first is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        if first is None:
            raise Diverged(steps[-1], trainer.current_epoch, math.nan, "the loss diverged on another rank")
        loss = float(losses[first])
        if math.isfinite(loss):
            reason = f"loss {loss:.4g} exceeds {self.factor:g} x the first step's loss {self.initial_loss:.4g}"
        else:
            reason = f"loss is {loss}"
        raise Diverged(steps[first], trainer.current_epoch, loss, reason)

    def state_dict(self) -> dict[str, Any]:
        return {"initial_loss": self.initial_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_loss = state_dict.get("initial_loss")


class FirstStepClock(Callback):
    """The wall time at which the first training batch starts (for summary.json's startup_seconds)."""

    def __init__(self):
        self.first_step_at: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_step_at is None:
            self.first_step_at = time.time()


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting optimizer steps, not training_step calls: a call trains on
    `trainer.steps_per_execution` batches, a step takes `trainer.accumulate_grad_batches` (see grouping.py)."""

    @property
    def total_train_batches(self) -> int | float:
        steps = optimizer_steps_per_epoch(self.trainer)
        return super().total_train_batches if steps is None else steps

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start_step = trainer.global_step
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        steps_done = trainer.global_step - self._epoch_start_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, steps_done - 1)


def build_callbacks(cfg: DictConfig, run_dir: RunDir, validation_stages: tuple[str, ...] = ("val",)
                    ) -> tuple[list[Callback], MonitorTracker]:
    """The callbacks group's entries, its two display switches, and the tracker that summary.json reads.
    `validation_stages`: what the validation loop logs (none: it does not run)."""
    monitor = watched_monitor(cfg.monitor, ("train", *validation_stages))
    tracker = MonitorTracker(monitor, cfg.mode)
    context = {"monitor": monitor, "mode": cfg.mode, "run_dir": run_dir, "validating": bool(validation_stages)}
    callbacks = [*instantiate_callbacks(cfg, context), tracker]
    if cfg.model_summary:
        callbacks.append(RichModelSummary(max_depth=1))
    if show_progress_bar(cfg.progress_bar):
        callbacks.append(StepProgressBar(leave=False))
    return callbacks, tracker


def instantiate_callbacks(cfg: DictConfig, context: Mapping[str, Any]) -> list[Callback]:
    """Every entry of `cfg` that has a `_target_`, in order, but those with `enabled: false`. A target
    gets the `context` values its signature names (monitor, mode, run_dir, validating) and may return
    one callback or a list of them."""
    callbacks: list[Callback] = []
    for name, entry in cfg.items():
        if not isinstance(entry, DictConfig) or entry.get("_target_") is None:
            continue
        knobs = OmegaConf.to_container(entry, resolve=True)
        if not knobs.pop("enabled", True):
            continue
        hint = "Name a callback class as module.Class, with its module on PYTHONPATH."
        try:
            target = get_object(knobs["_target_"])
            wanted = inspect.signature(target).parameters
        except (ImportError, AttributeError, ValueError, TypeError) as err:  # TypeError: not callable (a module)
            raise UserError(f"callbacks.{name}._target_ = {knobs['_target_']}: not a callback class ({err})", hint,
                            title="Unknown callback") from err
        try:
            built = instantiate(knobs, **{key: value for key, value in context.items() if key in wanted})
        except InstantiationException as err:  # the class refused its knobs
            raise UserError(f"callbacks.{name}: {knobs['_target_']} cannot be built with its knobs: {err}", hint,
                            title="Unknown callback") from err
        built = built if isinstance(built, list) else [built]
        if not all(isinstance(callback, Callback) for callback in built):
            raise UserError(f"callbacks.{name}._target_ = {knobs['_target_']} made {type(built[0]).__name__}, "
                            "not a Lightning callback.", hint, title="Unknown callback")
        callbacks += built
    return callbacks


def watched_monitor(monitor: str, stages: tuple[str, ...]) -> str | None:
    """`monitor`, or None when no stage of the run logs it: a val/* monitor without validation
    (dataset.val_fraction=0). Such a run trains for trainer.max_epochs, and best.ckpt is its last epoch."""
    stage = monitor.rpartition("/")[0]
    return None if stage and stage not in stages else monitor


def early_stopping(monitor: str | None, mode: str, validating: bool, patience: int, min_delta: float,
                   stopping_threshold: float | None) -> EarlyStopping | list:
    """Lightning's EarlyStopping on the run's monitor; without validation it checks at training epoch ends.
    Nothing (an empty list) when nothing is monitored."""
    if monitor is None:
        return []
    return EarlyStopping(
        monitor=monitor,
        mode=mode,
        patience=patience,
        min_delta=min_delta,
        stopping_threshold=stopping_threshold,
        check_on_train_epoch_end=not validating,
        check_finite=False,  # a NaN loss is a result (diverged), reported by dlrun, not a stop reason here
    )


def checkpoints(monitor: str | None, mode: str, validating: bool, run_dir: RunDir, save_last: bool) -> list[Callback]:
    """`best.ckpt` (ModelCheckpoint's; the last epoch's when nothing is monitored), and with `save_last` the
    resumable `last.ckpt` (ResumeCheckpoint's, written at epoch starts, where resuming is exact, rather than
    after validation as ModelCheckpoint would)."""
    best = ModelCheckpoint(  # the first Checkpoint in the list: trainer.checkpoint_callback, which run.py tests
        dirpath=run_dir.checkpoint_dir,
        filename="best",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        save_last=False,  # ResumeCheckpoint writes last.ckpt
        auto_insert_metric_name=False,
        enable_version_counter=False,
        save_on_train_epoch_end=not validating,  # without validation, metrics are logged at training epoch ends
    )
    return [best, ResumeCheckpoint(run_dir)] if save_last else [best]


def show_progress_bar(setting: bool | str) -> bool:
    if setting == "auto":
        return sys.stdout.isatty()
    return bool(setting)
