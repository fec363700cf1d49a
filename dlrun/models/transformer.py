"""Transformer encoder (notes 000 §10, 004 §9): multi-head softmax(QKᵀ/√d)V, add & layer norm, FFN.

Inputs are projected to `d_model` features (token indices: embedded), a positional encoding is added,
and `layers` post-norm encoder layers follow, as in Vaswani et al. Many-to-one outputs pool the steps
(`mean`, the `last` step, or a learned `cls` token prepended to the sequence). On a language-model data
set every step is predicted under a causal mask, so step t attends to steps <= t only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.errors import UserError
from dlrun.models.activations import make_activation
from dlrun.models.base import Network, SequenceInput, sequence_shape


def sinusoidal_encoding(steps: int, dim: int) -> torch.Tensor:
    """PE[t, 2i] = sin(t / 10000^(2i/d)), PE[t, 2i+1] = cos(...): (steps, dim)."""
    position = torch.arange(steps, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(steps, dim)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return encoding


class Transformer(Network):
    """Encoder-only transformer over (T, F) sequences; images are read row by row."""

    per_step_capable = True

    def __init__(
        self,
        spec: DataSpec,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ffn: int = 128,
        dropout: float = 0.1,
        pooling: str = "mean",
        positional: str = "sinusoidal",
        activation: str = "relu",
    ):
        super().__init__(spec)
        if d_model % heads:
            raise UserError(
                f"model.d_model = {d_model} is not divisible by model.heads = {heads}.",
                "Each head gets d_model / heads features: pick d_model a multiple of heads.",
            )
        self.pooling = "none" if spec.per_step else pooling
        steps, _ = sequence_shape(spec)
        steps += self.pooling == "cls"
        self.input = SequenceInput(spec, d_model, project=True)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if self.pooling == "cls" else None
        # "none" leaves attention blind to order: the encoder then sees a set, not a sequence
        self.register_buffer("position", None, persistent=False)
        if positional == "learned":
            self.position = nn.Parameter(torch.randn(steps, d_model) * 0.02)
        elif positional == "sinusoidal":
            self.position = sinusoidal_encoding(steps, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, ffn, dropout, activation=make_activation(activation), batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, spec.num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input(x)
        if self.cls is not None:
            h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1)
        steps = h.shape[1]
        if self.position is not None:
            h = h + self.position[:steps]
        h = self.drop(h)
        if self.pooling == "none":  # a language model: step t sees steps <= t
            mask = nn.Transformer.generate_square_subsequent_mask(steps, device=h.device, dtype=h.dtype)
            return self.head(self.encoder(h, mask=mask, is_causal=True))
        h = self.encoder(h)
        if self.pooling == "mean":
            return self.head(h.mean(dim=1))
        return self.head(h[:, 0] if self.pooling == "cls" else h[:, -1])
