"""Generative adversarial network (notes 000 §14.4): a generator G maps noise z ~ N(0, I) to a sample, a
discriminator D gives the probability that a sample is real. Both are MLPs (`arch=mlp`, any input) or small
DCGAN-style convolutional networks (`arch=dcgan`, images whose sides divide by 4): strided transposed
convolutions up, strided convolutions down, batch norm, LeakyReLU(0.2) in D (Radford et al., 2016).

The game, the losses and the k discriminator steps per generator step are the `adversarial` task's and its
training loop's (dlrun/training/tasks.py, dlrun/training/generative.py); the network only computes.
Samples are in [0, 1] (a sigmoid), shaped like the data, which dlrun scales to [0, 1] for this model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.models.base import Network
from dlrun.training.tasks import Adversarial


class GAN(Network):
    """`generator(z)` makes samples, `discriminator(x)` scores them (a logit: D(x) = sigmoid of it);
    `forward(x)` is the discriminator's logit, what evaluating a trained run on data computes."""

    accepts = frozenset({"image", "flat"})
    task = "adversarial"  # the inputs alone, scaled to [0, 1]: samples are probabilities of "on" pixels

    def __init__(
        self,
        spec: DataSpec,
        arch: str = "mlp",
        latent_dim: int = 32,
        width: int = 256,
        channels: int = 32,
        k: int = 1,
        generator_loss: str = "non_saturating",
    ):
        super().__init__(spec)
        self.latent_dim, self.k, self.generator_loss = latent_dim, k, generator_loss
        if arch == "dcgan":
            if spec.kind != "image" or spec.input_shape[1] % 4 or spec.input_shape[2] % 4:
                raise self.refuse("arch=dcgan upsamples twice by 2, so it needs images whose sides divide by 4",
                                  "Use model.arch=mlp, which takes any input.")
            self.generator, self.discriminator = _dcgan(spec.input_shape, latent_dim, channels)
        else:
            features = spec.flat_features
            self.generator = nn.Sequential(
                nn.Linear(latent_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                nn.Linear(width, features), nn.Sigmoid(), nn.Unflatten(1, spec.input_shape),
            )
            self.discriminator = nn.Sequential(
                nn.Flatten(), nn.Linear(features, width), nn.LeakyReLU(0.2),
                nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Linear(width, 1),
            )

    def make_task(self) -> Adversarial:
        return Adversarial(self.generator_loss)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x).squeeze(-1)

    def noise(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=device, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` generated samples in [0, 1], shaped like the data (evaluation mode: batch norm's running
        statistics)."""
        training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            return self.generator(self.noise(n, device, generator))
        finally:
            self.train(training)


def _dcgan(shape: tuple[int, ...], latent_dim: int, channels: int) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator for (C, H, W) images, H and W multiples of 4."""
    c, h, w = shape
    base = (2 * channels, h // 4, w // 4)

    def up(c_in: int, c_out: int) -> nn.Module:  # doubles height and width
        return nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)

    def down(c_in: int, c_out: int) -> nn.Module:  # halves them
        return nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1)

    generator = nn.Sequential(
        nn.Linear(latent_dim, math.prod(base)), nn.Unflatten(1, base), nn.BatchNorm2d(base[0]), nn.ReLU(),
        up(2 * channels, channels), nn.BatchNorm2d(channels), nn.ReLU(),
        up(channels, c), nn.Sigmoid(),
    )
    discriminator = nn.Sequential(
        down(c, channels), nn.LeakyReLU(0.2),
        down(channels, 2 * channels), nn.BatchNorm2d(2 * channels), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(math.prod(base), 1),
    )
    return generator, discriminator
