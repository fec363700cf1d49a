"""Regularizers, composable as a list (`regularizer=[l2,dropout]`).

Each one acts through one or more hooks of `Regularizer`; the LightningModule calls every hook of
every selected regularizer. A new regularizer is one YAML file plus one subclass here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def penalized_weights(network: nn.Module) -> list[torch.Tensor]:
    """Weights that weight penalties apply to: matrices and kernels, not biases or normalization scales."""
    return [p for p in network.parameters() if p.requires_grad and p.dim() > 1]


class Regularizer:
    """Base: every hook does nothing."""

    name = "regularizer"
    #: model knobs this regularizer sets; build_network applies them to the knobs the model has
    model_knobs: tuple[str, ...] = ()

    def model_overrides(self) -> dict[str, Any]:
        return {}

    def penalty(self, network: nn.Module) -> torch.Tensor | None:
        """A term added to the training loss (logged apart as train/penalty)."""
        return None


class L2(Regularizer):
    """J + alpha * 1/2 * sum ||W||^2 over weights (notes 000 §5.1.1): the gradient gains alpha * W."""

    name = "l2"

    def __init__(self, alpha: float = 1e-4):
        self.alpha = alpha

    def penalty(self, network):
        return 0.5 * self.alpha * sum((w * w).sum() for w in penalized_weights(network))


class Dropout(Regularizer):
    """Inverted dropout (000 §5.2.7): sets the model's hidden (`p`) and input (`p_input`) drop probabilities."""

    name = "dropout"
    model_knobs = ("dropout", "input_dropout")

    def __init__(self, p: float = 0.5, p_input: float = 0.2):
        self.p = p
        self.p_input = p_input

    def model_overrides(self):
        return {"dropout": self.p, "input_dropout": self.p_input}
