"""A small VGG (Simonyan & Zisserman 2015; notes 004 §7.5.3): blocks of 3x3 convolutions, then FC layers.

Block i has `convs` 3x3 'same' convolutions of width * 2^i channels and ends in a 2x2 max pool (skipped
once the map is 1 pixel wide, so small images such as 8x8 digits still take three blocks).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.models.activations import make_activation
from dlrun.models.base import Network
from dlrun.models.cnn import dense_head


class VGG(Network):
    """`blocks` stacks of `convs` 3x3 convolutions, widths doubling per block, then a dense head."""

    accepts = frozenset({"image"})

    def __init__(
        self,
        spec: DataSpec,
        blocks: int = 3,
        width: int = 16,
        convs: int = 2,
        activation: str = "relu",
        batch_norm: bool = False,
        hidden: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__(spec)
        in_ch, *size = spec.input_shape
        layers: list[nn.Module] = []
        for block in range(blocks):
            out_ch = width * 2**block
            for _ in range(convs):
                layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out_ch))
                layers.append(make_activation(activation))
                in_ch = out_ch
            if min(size) >= 2:
                layers.append(nn.MaxPool2d(2))
                size = [s // 2 for s in size]
        self.features = nn.Sequential(*layers)
        self.head = dense_head(in_ch * math.prod(size), hidden, spec.num_outputs, activation, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
