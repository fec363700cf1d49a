"""Regularizers, composable as a list (`regularizer=[l1,dropout,grad_clip]`).

Each one acts through one or more hooks of `Regularizer`; `Experiment` (module.py) calls every hook of
every selected regularizer, in list order, at these points of a training step:

    transform_batch(x, y)              training batches only: augmentation, input noise
    weight_perturbation(network)       additive changes to parameters for this forward pass only
    penalty(network)                   a term added to the loss (logged apart as train/penalty)
    on_before_optimizer_step(network)  gradients are final (after backward, unscaled): clipping
    on_after_optimizer_step(network)   weights were just updated: max-norm constraints

and, once while the experiment is built (run.py), `model_overrides()` (model knobs such as dropout)
and `task_overrides()` (the loss's knobs such as label smoothing). A new regularizer is one YAML
file plus one subclass here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlrun.errors import UserError


def penalized_weights(network: nn.Module) -> list[torch.Tensor]:
    """Weights that weight penalties apply to: matrices and kernels, not biases or normalization scales."""
    return [p for p in network.parameters() if p.requires_grad and p.dim() > 1]


class Regularizer:
    """Base: every hook does nothing."""

    name = "regularizer"
    #: model knobs this regularizer sets; build_network applies them to the knobs the model has
    model_knobs: tuple[str, ...] = ()

    def model_overrides(self) -> dict[str, Any]:
        return {}

    def task_overrides(self) -> dict[str, Any]:
        """Keyword arguments for `make_task` (the loss), e.g. label_smoothing."""
        return {}

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch, changed (a new tensor: batches may share memory with the data set)."""
        return x, y

    def weight_perturbation(self, network: nn.Module) -> dict[str, torch.Tensor]:
        """{parameter name: additive change} used in this training forward pass only.

        The network's own parameters are never modified, so there is nothing to undo afterwards, and the
        gradient is that of the loss at the perturbed point, with respect to the unperturbed parameters.
        """
        return {}

    def penalty(self, network: nn.Module) -> torch.Tensor | None:
        """A term added to the training loss (logged apart as train/penalty)."""
        return None

    def on_before_optimizer_step(self, network: nn.Module) -> None:
        """Called once the gradients are final, before the optimizer uses them."""

    def on_after_optimizer_step(self, network: nn.Module) -> None:
        """Called right after each optimizer step."""


def _require_float_inputs(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise UserError(
            f"regularizer={name} adds noise to the inputs, and this data set's inputs are token indices.",
            f"Drop {name}; for token inputs use dropout or weight_noise.",
            title="Incompatible regularizer and data set",
        )


def add_gaussian_noise(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x + N(0, sigma^2), independently for every element (inputs are standardized, so sigma is relative)."""
    return x + sigma * torch.randn_like(x) if sigma > 0 else x


# --- penalties ---------------------------------------------------------------------------------------
class ElasticNet(Regularizer):
    """J + l1 * ||w||_1 + l2 * 1/2 * ||w||^2 over the weights (not biases, not normalization parameters).

    The gradient gains l1 * sign(w) + l2 * w (000 §5.1). `l1` and `l2` are this with one term, so the
    three penalties share one definition of which weights are penalized and how.
    """

    name = "elastic"

    def __init__(self, l1: float = 1e-5, l2: float = 1e-4):
        self.l1 = l1
        self.l2 = l2

    def penalty(self, network):
        weights = penalized_weights(network)
        terms = []
        if self.l1:
            terms += [self.l1 * w.abs().sum() for w in weights]
        if self.l2:
            terms += [0.5 * self.l2 * (w * w).sum() for w in weights]
        return torch.stack(terms).sum() if terms else None


class L1(ElasticNet):
    """J + alpha * ||w||_1 (000 §5.1.2): drives weights to exactly zero, a sparse solution."""

    name = "l1"

    def __init__(self, alpha: float = 1e-5):
        super().__init__(l1=alpha, l2=0.0)


class L2(ElasticNet):
    """J + alpha * 1/2 * ||w||^2 (000 §5.1.1): the gradient gains alpha * w, weight decay."""

    name = "l2"

    def __init__(self, alpha: float = 1e-4):
        super().__init__(l1=0.0, l2=alpha)


# --- the network and the loss ------------------------------------------------------------------------
class Dropout(Regularizer):
    """Inverted dropout (000 §5.2.7): sets the model's hidden (`p`) and input (`p_input`) drop probabilities."""

    name = "dropout"
    model_knobs = ("dropout", "input_dropout")

    def __init__(self, p: float = 0.5, p_input: float = 0.2):
        self.p = p
        self.p_input = p_input

    def model_overrides(self):
        return {"dropout": self.p, "input_dropout": self.p_input}


class LabelSmoothing(Regularizer):
    """Soft targets (003): 1 - epsilon on the true class, epsilon shared by the others (tasks.py)."""

    name = "label_smoothing"

    def __init__(self, epsilon: float = 0.1):
        self.epsilon = epsilon

    def task_overrides(self):
        return {"label_smoothing": self.epsilon}


# --- noise ---------------------------------------------------------------------------------------------
class InputNoise(Regularizer):
    """Additive Gaussian noise on every training input (003: noise injection)."""

    name = "input_noise"

    def __init__(self, sigma: float = 0.1):
        self.sigma = sigma

    def transform_batch(self, x, y):
        _require_float_inputs(x, self.name)
        return add_gaussian_noise(x, self.sigma), y


class WeightNoise(Regularizer):
    """Gaussian noise on the weights for each training forward pass (003; Graves' noisy weights for RNNs)."""

    name = "weight_noise"

    def __init__(self, sigma: float = 0.01):
        self.sigma = sigma

    def weight_perturbation(self, network):
        if self.sigma <= 0:
            return {}
        return {
            name: self.sigma * torch.randn_like(p)
            for name, p in network.named_parameters()
            if p.requires_grad and p.dim() > 1
        }


class Augment(Regularizer):
    """Random transformations of each training sample, batched on the training device (002 §6.4.4, 004 §5.9).

    Every sample draws its own parameters. Images (N, C, H, W) get every enabled transform: a random
    crop of the image padded by `crop_padding` pixels (a shift with zero fill: the mean of standardized
    data), a horizontal `flip` with probability 1/2, a small affine map (rotation up to `degrees`, zoom by
    up to `scale`), `brightness` and `contrast` jitter with factors b, c ~ U(1 - knob, 1 + knob), a `cutout`
    square of that many pixels set to zero, and Gaussian noise of std `sigma`. Brightness adds (b - 1) times
    the image's own std (standardized pixels have no black at 0 to scale from); contrast scales the deviation
    from the image's own mean by c. Sequences and flat vectors get only the noise: shifting or mirroring
    them has no general meaning.
    """

    name = "augment"

    def __init__(
        self,
        crop_padding: int = 1,
        flip: bool = False,
        degrees: float = 10.0,
        scale: float = 0.1,
        brightness: float = 0.2,
        contrast: float = 0.2,
        cutout: int = 2,
        sigma: float = 0.05,
    ):
        self.crop_padding = crop_padding
        self.flip = flip
        self.degrees = degrees
        self.scale = scale
        self.brightness = brightness
        self.contrast = contrast
        self.cutout = cutout
        self.sigma = sigma

    def transform_batch(self, x, y):
        _require_float_inputs(x, self.name)
        if x.dim() == 4:
            x = self._geometric(x)
            x = self._photometric(x)
            x = self._cutout(x)
        return add_gaussian_noise(x, self.sigma), y

    def _geometric(self, x: torch.Tensor) -> torch.Tensor:
        """Crop (shift), flip, rotation and zoom as one affine map per sample, one grid_sample for all."""
        if not (self.crop_padding or self.flip or self.degrees or self.scale):
            return x
        n, _, h, w = x.shape
        dev, dtype = x.device, x.dtype

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, device=dev, dtype=dtype)

        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180)
        zoom = uniform(1 - self.scale, 1 + self.scale)
        mirror = (
            torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0).to(dtype)
            if self.flip
            else torch.ones_like(zoom)
        )
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # output pixel -> input pixel, in pixel units about the centre: rotate, unzoom, mirror horizontally
        a_pix = torch.stack([torch.stack([cos * mirror, -sin], -1), torch.stack([sin * mirror, cos], -1)], -2)
        to_norm = torch.tensor([2 / w, 2 / h], device=dev, dtype=dtype)
        a_norm = a_pix * to_norm.view(1, 2, 1) / to_norm.view(1, 1, 2)  # D^-1 A D, D = diag(w/2, h/2)
        pad = self.crop_padding
        shift = torch.randint(-pad, pad + 1, (n, 2), device=dev).to(dtype) * to_norm
        theta = torch.cat([a_norm, shift.unsqueeze(-1)], dim=-1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _photometric(self, x: torch.Tensor) -> torch.Tensor:
        """Brightness, then contrast, each from one factor per sample and the sample's own statistics."""
        factor_shape = (x.shape[0], 1, 1, 1)

        def factor(spread: float) -> torch.Tensor:
            return 1 + spread * (2 * torch.rand(factor_shape, device=x.device, dtype=x.dtype) - 1)

        if self.brightness:
            # a shift, not a scale: standardized pixels have no black at 0 to scale from
            x = x + (factor(self.brightness) - 1) * x.std(dim=(1, 2, 3), keepdim=True, correction=0)
        if self.contrast:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = mean + factor(self.contrast) * (x - mean)
        return x

    def _cutout(self, x: torch.Tensor) -> torch.Tensor:
        """Zero one `cutout` x `cutout` square per sample, centred anywhere (it may hang over an edge)."""
        if not self.cutout:
            return x
        n, _, h, w = x.shape
        top = torch.randint(0, h, (n, 1, 1), device=x.device) - self.cutout // 2
        left = torch.randint(0, w, (n, 1, 1), device=x.device) - self.cutout // 2
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        inside = (rows >= top) & (rows < top + self.cutout) & (cols >= left) & (cols < left + self.cutout)
        return x.masked_fill(inside.unsqueeze(1), 0.0)


# --- gradients and weights after backward ----------------------------------------------------------
class GradClip(Regularizer):
    """Gradient clipping (004 eq. 32): by norm, g <- threshold * g / ||g|| when ||g|| > threshold, over
    all parameters at once (the direction is kept); or by value, each element into [-threshold, threshold]."""

    name = "grad_clip"

    def __init__(self, threshold: float = 1.0, algorithm: str = "norm"):
        self.threshold = threshold
        self.algorithm = algorithm

    def on_before_optimizer_step(self, network):
        params = [p for p in network.parameters() if p.grad is not None]
        if self.algorithm == "value":
            nn.utils.clip_grad_value_(params, self.threshold)
        else:
            nn.utils.clip_grad_norm_(params, self.threshold)


class MaxNorm(Regularizer):
    """Max-norm constraint (004 Table 9): after each step, rescale every unit's incoming weight vector
    (a row of a Linear weight, an output channel of a conv kernel) whose norm exceeds `c` back to norm c."""

    name = "max_norm"

    def __init__(self, c: float = 3.0):
        self.c = c

    @torch.no_grad()
    def on_after_optimizer_step(self, network):
        for w in penalized_weights(network):
            w.renorm_(p=2, dim=0, maxnorm=self.c)
