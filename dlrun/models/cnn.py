"""Convolutional network: conv -> (batch norm) -> nonlinearity -> pool blocks, then FC (notes 000 §7)."""

from __future__ import annotations

import torch
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.models.activations import make_activation
from dlrun.models.base import Network


class CNN(Network):
    """One block per entry of `channels`. Takes images only; sequences are refused (use tcn for 1-D)."""

    accepts = frozenset({"image"})

    def __init__(
        self,
        spec: DataSpec,
        channels: int | list[int] = (16, 32),
        kernel: int = 3,
        stride: int = 1,
        padding: str = "same",
        pool: str = "max",
        activation: str = "relu",
        batch_norm: bool = False,
        hidden: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__(spec)
        channels = list(channels) if isinstance(channels, (list, tuple)) else [channels]
        in_ch, h, w = spec.input_shape
        blocks: list[nn.Module] = []
        for out_ch in channels:
            pad = kernel // 2 if padding == "same" else 0
            blocks.append(nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=pad))
            h, w = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
            if batch_norm:
                blocks.append(nn.BatchNorm2d(out_ch))
            blocks.append(make_activation(activation))
            if pool != "none" and min(h, w) >= 2:  # small inputs (8x8 digits) run out of room to pool
                blocks.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
                h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise ValueError(f"the input {spec.input_shape} is too small for {len(channels)} conv blocks")
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        head: list[nn.Module] = [nn.Flatten()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        fan_in = in_ch * h * w
        if hidden > 0:
            head += [nn.Linear(fan_in, hidden), make_activation(activation)]
            if dropout > 0:
                head.append(nn.Dropout(dropout))
            fan_in = hidden
        head.append(nn.Linear(fan_in, spec.num_outputs))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
