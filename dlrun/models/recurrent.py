"""Recurrent networks (notes 000 §8): vanilla RNN, GRU and LSTM, one shared body.

Many-to-one by default: the last step's hidden state feeds a linear head. On a language-model data set
(targets at every step) the head reads every step's state instead and returns (N, T, vocabulary).
Images are read row by row, flat vectors one feature per step, token indices through an embedding of
size `hidden`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.errors import UserError
from dlrun.models.base import Network, SequenceInput


class Recurrent(Network):
    """Shared body of rnn/gru/lstm; subclasses name the PyTorch cell."""

    cell: ClassVar[type[nn.RNNBase]]
    per_step_capable = True

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
        if hidden < 1:
            raise UserError(f"model.hidden = {hidden}: a recurrent network needs a state of at least 1 unit.")
        if bidirectional and spec.per_step:
            raise self.refuse(
                "a bidirectional network would read the characters it has to predict.",
                "Set model.bidirectional=false for a language model.",
            )
        self.input = SequenceInput(spec, hidden)
        self.rnn = self.cell(
            self.input.features,
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
        outputs, state = self.rnn(self.input(x))
        if self.spec.per_step:
            return self.head(self.drop(outputs))  # (N, T, outputs)
        h_n = state[0] if isinstance(state, tuple) else state  # LSTM returns (h_n, c_n)
        # The last layer's final state per direction: forward after the last step, backward after the first.
        last = torch.cat(list(h_n[-self.directions :]), dim=-1)
        return self.head(self.drop(last))


class RNN(Recurrent):
    """Vanilla RNN h_t = g(W h_{t-1} + U x_t + b) with g = tanh or relu (000 §8.2)."""

    cell = nn.RNN

    def __init__(self, spec: DataSpec, nonlinearity: str = "tanh", **kwargs):
        super().__init__(spec, nonlinearity=nonlinearity, **kwargs)


class GRU(Recurrent):
    """Update and reset gates (000 §8.8)."""

    cell = nn.GRU


class LSTM(Recurrent):
    """Forget/input/output gates and a cell state (000 §8.9)."""

    cell = nn.LSTM
