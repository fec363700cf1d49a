"""Learning-rate schedules from the `scheduler` group, as Lightning's lr_scheduler config."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig


def build_scheduler(
    scheduler_cfg: DictConfig, optimizer: torch.optim.Optimizer, monitor: str
) -> dict[str, Any] | None:
    """None for a constant rate; else the scheduler, stepped once per epoch (plateau watches `monitor`)."""
    if scheduler_cfg.get("_target_") is None:
        return None
    scheduler = instantiate(scheduler_cfg, optimizer=optimizer, _convert_="all")
    return {"scheduler": scheduler, "interval": "epoch", "monitor": monitor}
