"""Activation functions by config name (notes 002 §2.2, 004 §4.2)."""

from __future__ import annotations

from torch import nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "prelu": nn.PReLU,
    "elu": lambda: nn.ELU(alpha=1.0),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
    "gelu": nn.GELU,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module (PReLU has a parameter, so layers never share one)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(_ACTIVATIONS)}") from None
