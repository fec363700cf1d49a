"""Echo state network (notes 000 §8.10): a fixed random reservoir; only the linear readout trains.

The reservoir's state follows the leaky-integrator update of the notes,

    h_t = (1 - a) h_{t-1} + a tanh(U x_t + W h_{t-1}),      h_0 = 0,

with a = `leak_rate` (a = 1: a plain recurrent unit; smaller a: a longer memory). The notes write the new
term without the factor a; with it, h_t is a convex combination of states in [-1, 1] and stays there. W is
sparse (`density` of its entries nonzero, uniform in [-1, 1]), rescaled to `spectral_radius` (< 1 for the
echo state property: the effect of a past input fades); U is dense, uniform in [-input_scaling,
input_scaling]. Both are buffers, drawn once from the run's seed and saved in checkpoints, never trained:
the optimizer sees only the readout, a linear map of the last state (of every state for a language model).
"""

from __future__ import annotations

import torch
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.errors import UserError
from dlrun.models.base import Network, as_sequence, one_hot_tokens, sequence_shape


class ESN(Network):
    """Reads images row by row, flat vectors one feature per step, tokens one-hot, like the recurrent models."""

    per_step_capable = True

    def __init__(self, spec: DataSpec, reservoir: int = 200, spectral_radius: float = 0.9, leak_rate: float = 1.0,
                 input_scaling: float = 1.0, density: float = 0.1):
        super().__init__(spec)
        if not 0 < leak_rate <= 1:
            raise UserError(f"model.leak_rate = {leak_rate}: the leak rate a must be in (0, 1].")
        features = spec.vocab_size or sequence_shape(spec)[1]
        recurrent = (torch.rand(reservoir, reservoir) * 2 - 1) * (torch.rand(reservoir, reservoir) < density)
        radius = torch.linalg.eigvals(recurrent.double()).abs().max().item() if reservoir else 0.0
        if radius > 0:
            recurrent = recurrent * (spectral_radius / radius)
        self.register_buffer("recurrent", recurrent)  # W
        self.register_buffer("input_weights", (torch.rand(reservoir, features) * 2 - 1) * input_scaling)  # U
        self.leak_rate = leak_rate
        self.readout = nn.Linear(reservoir, spec.num_outputs)

    def states(self, x: torch.Tensor) -> torch.Tensor:
        """The reservoir's states after every step, (N, T, reservoir)."""
        x = as_sequence(one_hot_tokens(x, self.spec))
        drive = x @ self.input_weights.T  # U x_t for every step at once
        h = drive.new_zeros(x.shape[0], self.recurrent.shape[0])
        a, states = self.leak_rate, []
        for t in range(x.shape[1]):
            h = (1 - a) * h + a * torch.tanh(drive[:, t] + h @ self.recurrent.T)
            states.append(h)
        return torch.stack(states, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = self.states(x)
        return self.readout(states if self.spec.per_step else states[:, -1])
