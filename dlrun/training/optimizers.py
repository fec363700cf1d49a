"""Optimizers from the `optim` group: any class taking (params, **knobs), torch.optim's by default.

Every option of the group is a torch.optim class whose update equals the lecture notes' equation for
it, after the change of variables docs/optimization.md spells out (e.g. the notes' velocity
v = -lr * PyTorch's momentum buffer); tests/test_optim.py checks each against the notes' formula.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


class OptimizerFactory:
    """The optimizer class with its knobs, waiting for the parameters: what Experiment takes.

    `discriminator_lr` is dlrun's knob, not the class's: a GAN's second optimizer (its discriminator's) is
    made by `for_discriminator`, with the same class and knobs and this learning rate when it is set.
    """

    def __init__(self, optim_cfg: DictConfig):
        knobs = OmegaConf.to_container(optim_cfg, resolve=True)
        self.discriminator_lr = knobs.pop("discriminator_lr", None)  # absent from older runs' configs
        self._make = instantiate(knobs, _partial_=True, _convert_="all")

    def __call__(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return self._make(params)

    def for_discriminator(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.discriminator_lr is None:
            return self._make(params)
        return self._make(params, lr=self.discriminator_lr)


def optimizer_factory(optim_cfg: DictConfig) -> OptimizerFactory:
    return OptimizerFactory(optim_cfg)


def build_optimizer(optim_cfg: DictConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return optimizer_factory(optim_cfg)(params)
