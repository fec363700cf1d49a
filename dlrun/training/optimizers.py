"""Optimizers from the `optim` group: any class taking (params, **knobs), torch.optim's by default.

Every option of the group is a torch.optim class whose update equals the lecture notes' equation for
it, after the change of variables docs/optimization.md spells out (e.g. the notes' velocity
v = -lr * PyTorch's momentum buffer); tests/test_optim.py checks each against the notes' formula.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

#: the optimizer class with its knobs, waiting for the parameters: what Experiment takes
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def optimizer_factory(optim_cfg: DictConfig) -> OptimizerFactory:
    return instantiate(optim_cfg, _partial_=True, _convert_="all")


def build_optimizer(optim_cfg: DictConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return optimizer_factory(optim_cfg)(params)
