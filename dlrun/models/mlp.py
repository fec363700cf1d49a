"""Feed-forward network z = W a + b, a = g(z) (notes 000 §3.1), and its depth-0 case, one affine map.

Flattens any input (text in its one-hot view). With identity activations every depth collapses to one
affine map, as the notes claim; the tests check it by multiplying the weights out.
"""

from __future__ import annotations

import torch
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.models.activations import make_activation
from dlrun.models.base import Network, one_hot_tokens


class MLP(Network):
    """`depth` hidden layers of `width` units (or one layer per entry of a `width` list)."""

    def __init__(
        self,
        spec: DataSpec,
        width: int | list[int] = 128,
        depth: int = 2,
        activation: str = "relu",
        batch_norm: bool = False,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ):
        super().__init__(spec)
        widths = list(width) if isinstance(width, (list, tuple)) else [width] * depth
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        fan_in = spec.flat_features
        for w in widths:
            layers.append(nn.Linear(fan_in, w))
            if batch_norm:
                layers.append(nn.BatchNorm1d(w))
            layers.append(make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            fan_in = w
        layers.append(nn.Linear(fan_in, spec.num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(one_hot_tokens(x, self.spec))


class Affine(MLP):
    """One affine layer y = W x + b: logistic regression on classification data, linear on regression.

    The data set's task picks the loss (softmax/sigmoid cross-entropy or MSE), so `logreg` and `linear`
    are the same network under two names.
    """

    def __init__(self, spec: DataSpec, input_dropout: float = 0.0):
        super().__init__(spec, width=[], input_dropout=input_dropout)
