"""ResNet for small images (He et al. 2016, CIFAR variant; notes 002 §11.17, 004 §7.5.5).

A 3x3 stem, then three stages of basic blocks with width, 2 width and 4 width channels (the second and
third stages halve the map with a stride-2 convolution), global average pooling and a linear layer:
depth = 6 n + 2 weight layers for n blocks per stage (8, 14, 20, 32, 44, 56). A basic block computes
a[l+2] = g(z[l+2] + a[l]); where the shapes differ the skip is a projection (1x1 conv, stride 2, BN).
`residual: false` builds the same layers without the skips (and so without projections): the plain
network the notes compare against, which degrades as depth grows.
"""

from __future__ import annotations

import torch
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.errors import UserError
from dlrun.models.activations import make_activation
from dlrun.models.base import Network


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int, batch_norm: bool) -> list[nn.Module]:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=not batch_norm)
    return [conv, nn.BatchNorm2d(out_ch)] if batch_norm else [conv]


class BasicBlock(nn.Module):
    """Two 3x3 conv (+ BN) layers; the skip is added before the second activation when `residual`."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, batch_norm: bool, activation: str, residual: bool
    ):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(in_ch, out_ch, 3, stride, batch_norm),
            make_activation(activation),
            *conv_bn(out_ch, out_ch, 3, 1, batch_norm),
        )
        self.shortcut: nn.Module | None = None
        if residual:
            projection = stride != 1 or in_ch != out_ch
            self.shortcut = (
                nn.Sequential(*conv_bn(in_ch, out_ch, 1, stride, batch_norm)) if projection else nn.Identity()
            )
        self.out = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)
        if self.shortcut is not None:
            z = z + self.shortcut(x)
        return self.out(z)


class ResNet(Network):
    """Stem, 3 stages of (depth - 2) / 6 basic blocks, global average pool, linear head."""

    accepts = frozenset({"image"})

    def __init__(
        self,
        spec: DataSpec,
        depth: int = 14,
        width: int = 16,
        residual: bool = True,
        batch_norm: bool = True,
        activation: str = "relu",
    ):
        super().__init__(spec)
        if depth < 8 or (depth - 2) % 6:
            raise UserError(
                f"model.depth = {depth}: a ResNet here has 6n + 2 weight layers (n blocks in each of 3 stages).",
                "Pick model.depth from 8, 14, 20, 26, 32, 44, 56, ...",
            )
        blocks_per_stage = (depth - 2) // 6
        in_ch = spec.input_shape[0]
        layers: list[nn.Module] = [*conv_bn(in_ch, width, 3, 1, batch_norm), make_activation(activation)]
        in_ch = width
        for stage in range(3):
            out_ch = width * 2**stage
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_ch, out_ch, stride, batch_norm, activation, residual))
                in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, spec.num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
