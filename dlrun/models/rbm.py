"""Bernoulli restricted Boltzmann machine (notes 000 §13): binary visible units v and hidden units h,
energy E(v, h) = -bᵀv - cᵀh - vᵀWh, so that p(h_j = 1 | v) = σ(c + Wᵀv)_j and p(v_i = 1 | h) = σ(b + Wh)_i.

Trained by contrastive divergence (CD-k, §13.5): the log-likelihood gradient <v hᵀ>_data - <v hᵀ>_model with
the model's expectation taken after k steps of block Gibbs sampling started at the data. It is the gradient
of the free-energy difference F(v_data) - F(v_k) (v_k held fixed), with F(v) = -bᵀv - Σ_j softplus(c + Wᵀv)_j,
which is the objective dlrun's optimizer minimizes: any optimizer of the optim group then applies the CD
update (optim=sgd is the notes' plain one).

Inputs are scaled to [0, 1] (dlrun does it for this model) and, with `binarize`, thresholded at 0.5 into
binary visible units; otherwise the intensities are the data's visible values (a common relaxation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.models.base import Network
from dlrun.training.tasks import Boltzmann


class RBM(Network):
    """`hidden` binary hidden units; `cd_k` Gibbs steps per training update; `sample` runs Gibbs chains."""

    accepts = frozenset({"image", "flat"})
    task = "boltzmann"  # the inputs alone, scaled to [0, 1]

    def __init__(self, spec: DataSpec, hidden: int = 64, cd_k: int = 1, binarize: bool = True,
                 sample_steps: int = 200):
        super().__init__(spec)
        self.cd_k, self.binarize, self.sample_steps = cd_k, binarize, sample_steps
        visible = spec.flat_features
        self.weight = nn.Parameter(torch.randn(visible, hidden) * 0.01)  # small weights: Hinton's guide
        self.visible_bias = nn.Parameter(torch.zeros(visible))
        self.hidden_bias = nn.Parameter(torch.zeros(hidden))

    def make_task(self) -> Boltzmann:
        return Boltzmann()

    # --- the conditionals and the energy --------------------------------------------------------------
    def visible(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs as visible vectors (N, D) in [0, 1], binary with `binarize`."""
        v = x.flatten(1).clamp(0.0, 1.0)  # validation pixels may fall a little outside the training range
        return (v > 0.5).to(v.dtype) if self.binarize else v

    def hidden_probability(self, v: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(v @ self.weight + self.hidden_bias)

    def visible_probability(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(h @ self.weight.T + self.visible_bias)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) = -log Σ_h exp(-E(v, h)), per sample."""
        return -(v @ self.visible_bias) - F.softplus(v @ self.weight + self.hidden_bias).sum(-1)

    def gibbs(self, v: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`steps` steps of block Gibbs sampling v -> h -> v from `v`; returns the last visible sample."""
        for _ in range(steps):
            h = torch.bernoulli(self.hidden_probability(v), generator=generator)
            v = torch.bernoulli(self.visible_probability(h), generator=generator)
        return v

    # --- training and scoring -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mean-field reconstruction p(v | h = p(h | v)), shaped like `x`."""
        return self.visible_probability(self.hidden_probability(self.visible(x))).reshape(x.shape)

    def contrastive_divergence(self, x: torch.Tensor) -> torch.Tensor:
        """CD-k's objective for a batch: mean F(v) - mean F(v_k); its gradient is minus the CD estimate of
        the log-likelihood gradient."""
        v = self.visible(x)
        with torch.no_grad():
            v_k = self.gibbs(v, self.cd_k)
        return self.free_energy(v).mean() - self.free_energy(v_k).mean()

    @torch.no_grad()
    def statistics(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor | int]:
        """The Boltzmann task's sums over a batch: squared error of the mean-field reconstruction, and the
        log pseudo-likelihood Σ_i log p(v_i | v_-i) estimated as scikit-learn's BernoulliRBM does: D times
        the term of one unit per sample, drawn at random (with `generator`), on the binarized inputs."""
        v = self.visible(x)
        reconstruction = self.visible_probability(self.hidden_probability(v))
        binary = (v > 0.5).to(v.dtype)
        n, d = binary.shape
        unit = torch.randint(0, d, (n,), device=v.device, generator=generator)
        flipped = binary.clone()
        flipped[torch.arange(n, device=v.device), unit] = 1.0 - flipped[torch.arange(n, device=v.device), unit]
        log_conditional = -F.softplus(self.free_energy(binary) - self.free_energy(flipped))
        return {"squared_error": ((v - reconstruction) ** 2).sum(), "pseudo_ll": (d * log_conditional).sum(),
                "count": n, "units": n * d}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` samples from Gibbs chains of `sample_steps` steps started at uniform noise: the last step's
        p(v | h), in [0, 1], shaped like the data."""
        device = self.weight.device
        v = torch.bernoulli(torch.full((n, self.weight.shape[0]), 0.5, device=device), generator=generator)
        v = self.gibbs(v, self.sample_steps - 1, generator)
        h = torch.bernoulli(self.hidden_probability(v), generator=generator)
        return self.visible_probability(h).reshape(n, *self.spec.input_shape)
