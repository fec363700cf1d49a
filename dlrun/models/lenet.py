"""LeNet-5 (LeCun et al. 1998; notes 004 §7.5.1): two 5x5 conv + 2x2 pool stages, then C5, F6 and the output.

The network is defined on 32x32 images (LeCun padded 28x28 MNIST to 32x32): 32 -> conv 28 -> pool 14
-> conv 10 -> pool 5 -> C5, a 5x5 conv to 120 maps of 1x1 -> F6 (84) -> outputs. Images of any other
size are resized to 32x32 (bilinear) first, so the layers and the parameter count are always the
paper's. The original used a scaled tanh and average pooling ("subsampling"): the defaults here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.errors import UserError
from dlrun.models.activations import make_activation
from dlrun.models.base import Network

SIZE = 32


class LeNet5(Network):
    """C1 (6 maps, 5x5) - S2 - C3 (16 maps, 5x5) - S4 - C5 (120) - F6 (84) - output."""

    accepts = frozenset({"image"})

    def __init__(self, spec: DataSpec, activation: str = "tanh", pool: str = "avg"):
        super().__init__(spec)
        if pool not in ("max", "avg"):
            raise UserError(
                f"model.pool = {pool}: LeNet-5 pools twice; expected max or avg.", "Set model.pool=avg."
            )
        channels, *size = spec.input_shape
        self.resize = tuple(size) != (SIZE, SIZE)
        pooling = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        self.net = nn.Sequential(
            nn.Conv2d(channels, 6, 5), make_activation(activation), pooling(2),
            nn.Conv2d(6, 16, 5), make_activation(activation), pooling(2),
            nn.Conv2d(16, 120, 5), make_activation(activation), nn.Flatten(),
            nn.Linear(120, 84), make_activation(activation),
            nn.Linear(84, spec.num_outputs),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize:
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return self.net(x)
