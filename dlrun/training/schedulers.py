"""Learning-rate schedules from the `scheduler` group, as Lightning's lr_scheduler config.

An option names a scheduler class with `_target_` (torch.optim.lr_scheduler's, or one below for the
notes' schedules torch lacks); its other keys are constructor arguments, except the knobs in
`LIGHTNING_KNOBS`, which say when Lightning steps it. The schedule is a function of the epoch count t,
starting at 0 (the `epoch` column of metrics.csv): the first epoch trains at the configured `optim.lr`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import LRScheduler

#: scheduler-group keys that are not constructor arguments: `interval` (epoch | step) says what t counts
LIGHTNING_KNOBS = ("interval",)


@dataclass(frozen=True)
class Schedule:
    """A scheduler class with its knobs, waiting for the optimizer; `interval` says what its t counts."""

    make: Callable[[torch.optim.Optimizer], LRScheduler]
    interval: str = "epoch"

    def lightning_config(self, optimizer: torch.optim.Optimizer, monitor: str) -> dict[str, Any]:
        """The scheduler and when to step it (a plateau schedule watches `monitor`)."""
        return {"scheduler": self.make(optimizer), "interval": self.interval, "monitor": monitor}


def schedule_from_config(scheduler_cfg: DictConfig) -> Schedule | None:
    """None for a constant rate (`_target_: null`); else the class, its knobs and dlrun's `interval`."""
    if scheduler_cfg.get("_target_") is None:
        return None
    knobs = OmegaConf.to_container(scheduler_cfg, resolve=True)
    lightning = {key: knobs.pop(key) for key in LIGHTNING_KNOBS if key in knobs}
    return Schedule(instantiate(knobs, _partial_=True, _convert_="all"), lightning.get("interval", "epoch"))


def build_scheduler(
    scheduler_cfg: DictConfig, optimizer: torch.optim.Optimizer, monitor: str
) -> dict[str, Any] | None:
    """None for a constant rate; else the scheduler and when to step it (plateau watches `monitor`)."""
    schedule = schedule_from_config(scheduler_cfg)
    return None if schedule is None else schedule.lightning_config(optimizer, monitor)


class _ClosedFormLR(LRScheduler):
    """A schedule given as lr(base_lr, t): resumable from any t, and exact (no compounding of factors)."""

    def lr_at(self, base_lr: float, t: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


class InverseTimeLR(_ClosedFormLR):
    """lr_t = lr_0 / (1 + decay * t) (002 §8.3). With lr_0 = 0.2 and decay = 1: 0.2, 0.1, 0.0667, 0.05, 0.04."""

    def __init__(self, optimizer: torch.optim.Optimizer, decay: float = 1.0, last_epoch: int = -1):
        self.decay = decay
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, t):
        return base_lr / (1.0 + self.decay * t)


class WarmupCosineLR(_ClosedFormLR):
    """Linear warm-up, then cosine decay (not in the notes; the usual schedule for transformers).

    t < warmup_iters: lr_0 * (t + 1) / (warmup_iters + 1), rising by equal steps; from t = warmup_iters
    (lr_0) to t = total_iters: eta_min + (lr_0 - eta_min) * (1 + cos(pi * progress)) / 2; eta_min after.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_iters: int = 5,
        total_iters: int = 50,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ):
        self.warmup_iters = warmup_iters
        self.total_iters = max(total_iters, warmup_iters + 1)
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, t):
        if t < self.warmup_iters:
            return base_lr * (t + 1) / (self.warmup_iters + 1)
        progress = min(1.0, (t - self.warmup_iters) / (self.total_iters - self.warmup_iters))
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * progress)) / 2
