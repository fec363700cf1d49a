"""Temporal convolutional network (notes 004 §8.4; Bai, Kolter & Koltun 2018): causal dilated 1-D convs.

One residual block per entry of `dilations`: two causal convolutions of `kernel` taps spaced `d` apart,
each followed by the activation and dropout, plus a skip (a 1x1 convolution where the channel count
changes). Causal: the output at step t reads steps <= t only (the input is padded on the left), so
the same network is a language model when the data set has a target at every step. The receptive
field is 1 + 2 (kernel - 1) Σ dilations steps; many-to-one outputs read the last step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.errors import UserError
from dlrun.models.activations import make_activation
from dlrun.models.base import Network, SequenceInput


class CausalConv(nn.Conv1d):
    """A dilated 1-D convolution padded on the left only: output t sees inputs t - (k-1) d .. t."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, ((self.kernel_size[0] - 1) * self.dilation[0], 0)))


class TemporalBlock(nn.Module):
    """x + F(x) with F = two (causal conv -> activation -> dropout) layers."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int, activation: str, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            CausalConv(in_ch, out_ch, kernel, dilation=dilation),
            make_activation(activation),
            nn.Dropout(dropout),
            CausalConv(out_ch, out_ch, kernel, dilation=dilation),
            make_activation(activation),
            nn.Dropout(dropout),
        )
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.out = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.skip(x))


class TCN(Network):
    """Stacked temporal blocks over (T, F) sequences; images are read row by row."""

    per_step_capable = True

    def __init__(
        self,
        spec: DataSpec,
        channels: int | list[int] = 32,
        kernel: int = 3,
        dilations: int | list[int] = (1, 2, 4, 8),
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__(spec)
        dilations = list(dilations) if isinstance(dilations, (list, tuple)) else [dilations]
        widths = list(channels) if isinstance(channels, (list, tuple)) else [channels] * len(dilations)
        if len(widths) != len(dilations):
            raise UserError(
                f"model.channels has {len(widths)} entries and model.dilations {len(dilations)}.",
                "Give one channel count per dilation, or a single channel count for all blocks.",
            )
        self.input = SequenceInput(spec, widths[0])
        in_ch = self.input.features
        blocks = []
        for width, dilation in zip(widths, dilations, strict=True):
            blocks.append(TemporalBlock(in_ch, width, kernel, dilation, activation, dropout))
            in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_ch, spec.num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.input(x).transpose(1, 2)).transpose(1, 2)  # convolve over time: (N, C, T)
        return self.head(h if self.spec.per_step else h[:, -1])
