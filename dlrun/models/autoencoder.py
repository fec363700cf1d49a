"""Autoencoders (notes 000 §11) and the variational autoencoder (000 §14.3): an encoder to a code, a decoder back.

Both read their input's shape from the DataSpec: an MLP encoder and decoder for any input (flattened), or
a convolutional pair for images (stride-2 convolutions down, transposed convolutions up). Each sets its
task (Network.task), so it trains on any data set's inputs alone, scaled to [0, 1], and returns a
`Reconstructed` record (dlrun/training/tasks.py) that the task scores against them.

The autoencoder's variants are knobs that combine: undercomplete (a `latent_dim` below the input's size),
sparse (`sparsity`, an L1 penalty on the code), denoising (`input_noise` on the encoder's input while
training, the clean input as the target) and contractive (`contractive`, the squared Frobenius norm of
the encoder's Jacobian). With `width: 0` and recon_loss=mse it is linear, and spans PCA's subspace.

What the pictures and the sample-quality score ask of a model (dlrun/pictures.py): `reconstruct(x)`,
`encode(x)` and, for a generative model, `sample(n, generator)`, all in [0, 1] like the inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.models.activations import make_activation
from dlrun.models.base import Network
from dlrun.training.tasks import Reconstructed

LIKELIHOODS = {"bce": "bernoulli", "mse": "gaussian"}  # recon_loss -> the decoder's distribution


class EncoderDecoder(Network):
    """An encoder from the input to `code_width` numbers and a decoder from `latent_dim` back to the input.

    MLP: `width` hidden layers (an int: one; 0: none), mirrored by the decoder. Conv (images): one stride-2
    3x3 convolution per entry of `channels`, mirrored by stride-2 transposed convolutions.
    """

    def __init__(
        self,
        spec: DataSpec,
        code_width: int,
        latent_dim: int,
        architecture: str = "mlp",
        width: int | list[int] = 256,
        channels: int | list[int] = (16, 32),
        activation: str = "relu",
        recon_loss: str = "bce",
    ):
        super().__init__(spec)
        if spec.vocab_size:
            raise self.refuse("its inputs are token indices, which have no [0, 1] scale to reconstruct.",
                              "Use an image, sequence or tabular data set (e.g. dataset=digits).")
        if architecture == "conv" and spec.kind != "image":
            raise self.refuse("architecture=conv needs images.", "Use model.architecture=mlp for this data set.")
        self.likelihood = LIKELIHOODS[recon_loss]
        if architecture == "conv":
            self.encoder, self.decoder = _conv_pair(spec.input_shape, code_width, latent_dim, channels, activation)
        else:
            widths = list(width) if isinstance(width, (list, tuple)) else ([width] if width else [])
            self.encoder = nn.Sequential(nn.Flatten(), *_dense([spec.flat_features, *widths, code_width], activation))
            self.decoder = nn.Sequential(*_dense([latent_dim, *widths[::-1], spec.flat_features], activation),
                                         nn.Unflatten(1, spec.input_shape))

    def mean(self, x_hat: torch.Tensor) -> torch.Tensor:
        """The decoder's output as an input in [0, 1]: the Bernoulli means (sigmoid of the logits) or the
        Gaussian means, clipped."""
        return torch.sigmoid(x_hat) if self.likelihood == "bernoulli" else x_hat.clamp(0, 1)


class Autoencoder(EncoderDecoder):
    """x -> h = f(x) -> g(h), trained to reconstruct x (000 §11), with the variants' penalties."""

    task = "reconstruction"

    def __init__(
        self,
        spec: DataSpec,
        latent_dim: int = 32,
        architecture: str = "mlp",
        width: int | list[int] = 256,
        channels: int | list[int] = (16, 32),
        activation: str = "relu",
        recon_loss: str = "bce",
        sparsity: float = 0.0,
        input_noise: float = 0.0,
        contractive: float = 0.0,
    ):
        super().__init__(spec, latent_dim, latent_dim, architecture, width, channels, activation, recon_loss)
        self.sparsity, self.input_noise, self.contractive = sparsity, input_noise, contractive

    def forward(self, x: torch.Tensor) -> Reconstructed:
        if self.training and self.input_noise > 0:  # denoising: corrupt the encoder's input, not the target
            x = x + self.input_noise * torch.randn_like(x)
        code = self.encoder(x)
        penalty = None
        if self.training:  # the penalties shape training only: evaluation scores the reconstruction
            terms = []
            if self.sparsity > 0:  # lambda ||h||_1, per sample
                terms.append(self.sparsity * code.abs().sum(1).mean())
            if self.contractive > 0:  # lambda ||dh/dx||_F^2, per sample
                terms.append(self.contractive * self.encoder_jacobian(x).pow(2).flatten(1).sum(1).mean())
            penalty = sum(terms) if terms else None
        return Reconstructed(self.decoder(code), self.likelihood, penalty=penalty)

    def encoder_jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """dh/dx of each sample, (N, latent_dim, *input shape), differentiable in the weights."""
        def encode_one(sample: torch.Tensor) -> torch.Tensor:
            return self.encoder(sample.unsqueeze(0)).squeeze(0)

        return torch.func.vmap(torch.func.jacrev(encode_one))(x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean(self.decoder(self.encoder(x)))


class VAE(EncoderDecoder):
    """A Gaussian encoder q(z|x) = N(mu, diag sigma^2), the reparameterization z = mu + sigma * eps with
    eps ~ N(0, I), a prior p(z) = N(0, I) and a Bernoulli (bce) or unit Gaussian (mse) decoder (000 §14.3).

    Trained on the negative ELBO, -log p(x|z) + beta KL(q(z|x) || p(z)): beta = 1 is the bound itself; beta > 1
    weighs the prior more (a beta-VAE), beta < 1 less. The KL of two Gaussians is in closed form."""

    task = "generative"

    def __init__(
        self,
        spec: DataSpec,
        latent_dim: int = 8,
        beta: float = 1.0,
        architecture: str = "mlp",
        width: int | list[int] = 256,
        channels: int | list[int] = (16, 32),
        activation: str = "relu",
        recon_loss: str = "bce",
    ):
        super().__init__(spec, 2 * latent_dim, latent_dim, architecture, width, channels, activation, recon_loss)
        self.latent_dim, self.beta = latent_dim, beta

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and log-variance of q(z|x)."""
        mu, log_var = self.encoder(x).chunk(2, dim=1)
        return mu, log_var

    def forward(self, x: torch.Tensor) -> Reconstructed:
        mu, log_var = self.posterior(x)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)  # the reparameterization trick
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var).sum(1)
        penalty = (self.beta - 1.0) * kl.mean() if self.training and self.beta != 1.0 else None
        return Reconstructed(self.decoder(z), self.likelihood, kl=kl, penalty=penalty)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean(self.decoder(self.posterior(x)[0]))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of the decoder's mean at z ~ p(z); `generator` (on the CPU) fixes the draws."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator).to(device)
        return self.mean(self.decoder(z))


def _dense(sizes: list[int], activation: str) -> list[nn.Module]:
    """Linear layers through `sizes`, the activation between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(make_activation(activation))
    return layers


def _conv_pair(
    input_shape: tuple[int, ...], code_width: int, latent_dim: int, channels: int | list[int], activation: str
) -> tuple[nn.Sequential, nn.Sequential]:
    """Stride-2 3x3 convolutions halving the map (rounding up) per entry of `channels`, then a linear layer to
    the code; the decoder undoes each halving with a transposed convolution whose output padding restores the
    encoder's size exactly (7 -> 4 -> 7, 8 -> 4 -> 8)."""
    channels = list(channels) if isinstance(channels, (list, tuple)) else [channels]
    in_ch, height, width = input_shape
    sizes, down = [(height, width)], []
    for c_in, c_out in zip([in_ch, *channels], channels, strict=False):
        down += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), make_activation(activation)]
        sizes.append(tuple(math.ceil(s / 2) for s in sizes[-1]))
    last = (channels[-1], *sizes[-1])
    flat = math.prod(last)
    encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(flat, code_width))
    up: list[nn.Module] = [nn.Linear(latent_dim, flat), make_activation(activation), nn.Unflatten(1, last)]
    outs = [in_ch, *channels][::-1][1:]  # channels after each transposed convolution, the input's last
    for i, (c_in, c_out) in enumerate(zip(channels[::-1], outs, strict=True)):
        small, large = sizes[-1 - i], sizes[-2 - i]
        padding = tuple(big - (2 * s - 1) for s, big in zip(small, large, strict=True))
        up.append(nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=padding))
        if i < len(channels) - 1:
            up.append(make_activation(activation))
    return encoder, nn.Sequential(*up)
