"""Optimizers from the `optim` group: any class taking (params, **knobs), torch.optim's by default."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig


def build_optimizer(optim_cfg: DictConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return instantiate(optim_cfg, params=params, _convert_="all")
