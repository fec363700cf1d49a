"""Recurrent networks read many-to-one: the last step's state feeds a linear head (notes 000 §8)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.models.base import Network, as_sequence, sequence_shape


class Recurrent(Network):
    """Shared body of rnn/gru/lstm: reads images row by row, flat vectors one feature per step."""

    cell: ClassVar[type[nn.RNNBase]]

    def __init__(
        self,
        spec: DataSpec,
        hidden: int = 64,
        layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        **cell_kwargs,
    ):
        super().__init__(spec)
        _, features = sequence_shape(spec)
        self.rnn = self.cell(
            features,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
            **cell_kwargs,
        )
        self.directions = 2 if bidirectional else 1
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(hidden * self.directions, spec.num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.rnn(as_sequence(x))
        h_n = state[0] if isinstance(state, tuple) else state  # LSTM returns (h_n, c_n)
        # The last layer's final state per direction: forward after the last step, backward after the first.
        last = torch.cat(list(h_n[-self.directions :]), dim=-1)
        return self.head(self.drop(last))


class LSTM(Recurrent):
    """Forget/input/output gates and a cell state (000 §8.9)."""

    cell = nn.LSTM
