"""Optimizers from the `optim` group: any class taking (params, **knobs), torch.optim's by default.

Every option of the group is a torch.optim class whose update equals the lecture notes' equation for
it, after the change of variables docs/optimization.md spells out (e.g. the notes' velocity
v = -lr * PyTorch's momentum buffer); tests/test_optim.py checks each against the notes' formula.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig


def build_optimizer(optim_cfg: DictConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return instantiate(optim_cfg, params=params, _convert_="all")
