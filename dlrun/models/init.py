"""Weight initialization, applied the same way to every network after it is built (notes 004 §4.2.2, 000 §6.4).

Schemes (the random ones Gaussian, mean 0, so that their variances are the ones the notes state):

- ``default``: leave PyTorch's own initialization as it is.
- ``zeros``: every weight 0: the notes' symmetry problem (hidden units stay identical).
- ``constant``: every weight ``init_value``; any constant behaves like zeros (004 §4.2.2): every unit of a
  layer computes the same function and gets the same gradient, so hidden units stay identical.
- ``normal``: σ = ``init_std`` (0.01 makes signals vanish, 0.2 saturates tanh/sigmoid).
- ``xavier``: Glorot & Bengio, σ² = 2 / (fan_in + fan_out).
- ``lecun``: σ² = 1 / fan_in: what the notes call "Xavier" (004 §4.2.2).
- ``he``: He et al., σ² = 2 / fan_in, for ReLU networks.

Which weights: those of fully connected, convolutional, recurrent and attention layers. Gate matrices
that PyTorch stacks into one tensor (an LSTM's four gates, attention's Q/K/V projection) are initialized
one gate at a time, so fan_out is that of one gate. Normalization layers, embeddings and PReLU slopes keep
their own initialization. Biases: ``init_bias`` when given (0.1 is the notes' positive ReLU bias), else 0
under every scheme but ``default``, which keeps PyTorch's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEMES = ("default", "zeros", "constant", "normal", "xavier", "he", "lecun")
KNOBS = ("init", "init_std", "init_bias", "init_value")

# Layers whose weights a scheme sets: weight-bearing layers, not normalization or lookup tables.
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.RNNBase, nn.MultiheadAttention)


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight (out, in, *kernel): inputs and outputs per unit, kernel included."""
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _init_weight(weight: torch.Tensor, scheme: str, std: float, value: float) -> None:
    if scheme == "constant":
        weight.fill_(value)
        return
    fan_in, fan_out = fans(weight)
    sigma = {
        "zeros": 0.0,
        "normal": std,
        "xavier": math.sqrt(2.0 / (fan_in + fan_out)),
        "lecun": math.sqrt(1.0 / fan_in),
        "he": math.sqrt(2.0 / fan_in),
    }[scheme]
    if sigma > 0:
        weight.normal_(0.0, sigma)
    else:
        weight.zero_()


def _gates(module: nn.Module, name: str) -> int:
    """How many matrices PyTorch stacks along dim 0 of this weight."""
    if isinstance(module, nn.RNNBase):
        return module.weight_ih_l0.shape[0] // module.hidden_size
    if isinstance(module, nn.MultiheadAttention) and name == "in_proj_weight":
        return 3
    return 1


@torch.no_grad()
def initialize(
    network: nn.Module, init: str = "default", init_std: float = 0.01, init_bias: float | None = None,
    init_value: float = 0.0,
) -> None:
    """Apply scheme `init` to every weight-bearing layer of `network`, in place."""
    if init not in SCHEMES:
        raise ValueError(f"unknown init scheme {init!r}; choose one of {', '.join(SCHEMES)}")
    for module in network.modules():
        if not isinstance(module, _LAYERS):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                if init != "default":
                    for gate in param.chunk(_gates(module, name), dim=0):
                        _init_weight(gate, init, init_std, init_value)
            elif "bias" in name and (init_bias is not None or init != "default"):
                param.fill_(0.0 if init_bias is None else init_bias)
