"""Convolutional network: conv -> (batch norm) -> nonlinearity -> pool blocks, then FC (notes 000 §7, 002 §11).

Images (C, H, W) get 2-D convolutions. Sequences (T, F) get 1-D convolutions along time with the F
features as input channels (text is read in its one-hot view). Flat vectors are refused: their features
have no order for a kernel to slide along.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.models.activations import make_activation
from dlrun.models.base import Network, one_hot_tokens

# Layer types per number of spatial dimensions: conv, batch norm, max pool, average pool.
_LAYERS = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d),
}


def conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a convolution along one dimension."""
    return (size + 2 * pad - kernel) // stride + 1


def dense_head(fan_in: int, hidden: int, outputs: int, activation: str, dropout: float) -> nn.Sequential:
    """Flatten -> dropout -> [Linear(hidden) -> activation -> dropout] -> Linear(outputs); hidden=0: one layer."""
    head: list[nn.Module] = [nn.Flatten()]
    if dropout > 0:
        head.append(nn.Dropout(dropout))
    if hidden > 0:
        head += [nn.Linear(fan_in, hidden), make_activation(activation)]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        fan_in = hidden
    head.append(nn.Linear(fan_in, outputs))
    return nn.Sequential(*head)


class CNN(Network):
    """One block per entry of `channels`: conv (kernel, stride, padding), batch norm, activation, pool 2.

    Pooling is skipped once a map is smaller than 2 (an 8x8 digit runs out of room after three blocks);
    a configuration that shrinks the map to nothing is refused with the shapes.
    """

    accepts = frozenset({"image", "sequence"})

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
        if spec.kind == "image":
            in_ch, *size = spec.input_shape
        else:  # (T, F): F channels along T steps
            size, in_ch = [spec.input_shape[0]], spec.input_shape[1]
        conv, norm, max_pool, avg_pool = _LAYERS[len(size)]
        self.sequence = spec.kind == "sequence"
        blocks: list[nn.Module] = []
        pad = kernel // 2 if padding == "same" else 0
        for out_ch in channels:
            blocks.append(conv(in_ch, out_ch, kernel, stride=stride, padding=pad))
            size = [conv_out(s, kernel, stride, pad) for s in size]
            if min(size) < 1:
                raise self.refuse(
                    f"{len(channels)} conv blocks of kernel {kernel}, stride {stride}, padding {padding} "
                    "shrink it to nothing.",
                    "Use fewer channels entries, padding=same, a smaller kernel or stride 1.",
                )
            if batch_norm:
                blocks.append(norm(out_ch))
            blocks.append(make_activation(activation))
            if pool != "none" and min(size) >= 2:
                blocks.append(max_pool(2) if pool == "max" else avg_pool(2))
                size = [s // 2 for s in size]
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.head = dense_head(in_ch * math.prod(size), hidden, spec.num_outputs, activation, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence:
            x = one_hot_tokens(x, self.spec).transpose(1, 2)  # (N, T, F) -> (N, F, T)
        return self.head(self.features(x))
