"""Loss and metrics per task: the loss, the sufficient statistics of a batch (sums, on the device) and the
epoch's metrics from their totals. Which metrics each task logs is declared in dlrun/metrics.py; the sums
are accumulated and reduced once per epoch by dlrun/training/metrics.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dlrun.data.spec import INPUT_TASKS, DataSpec
from dlrun.errors import UserError


class Task:
    """Loss for training and sufficient statistics for the epoch's metrics.

    `label_smoothing` follows the notes (003): the target puts 1 - epsilon on the true class and spreads
    epsilon evenly over the K - 1 others. It shapes the training objective only (`smooth=True`); the
    logged losses are the plain ones, so runs with and without smoothing compare.
    """

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def target(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What the network's output is scored against: the labels (the input tasks: the inputs)."""
        return y

    def loss(self, output: torch.Tensor, target: torch.Tensor, smooth: bool = False) -> torch.Tensor:
        """The batch's mean loss; against the smoothed targets when `smooth` (the training objective)."""
        raise NotImplementedError

    def objective(self, output: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """What a training step minimizes, before the regularizers' penalties; `loss` is the batch's logged
        data loss. Label smoothing changes the targets here, never in the logged loss."""
        return self.loss(output, target, smooth=True) if self.label_smoothing else loss

    def stats(self, output: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor) -> dict[str, torch.Tensor | int]:
        """Sums over the batch (or several batches, concatenated), as device tensors; counts known on the host
        as ints. `loss_sum` is the data loss summed over the scored targets (already computed)."""
        raise NotImplementedError

    def eval_stats(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """More sums, for the validation and test passes only: a training step pays nothing for them."""
        return {}

    #: the task's entry in dlrun/metrics.py's declaration: the names `metrics` returns, per stage
    kind: str = ""
    #: whether `stats` of concatenated batches are exactly the sums of each batch's (counts, and the loss
    #: sum the caller makes exact), so that a group of training steps may be scored at once
    scores_groups: bool = True

    def metrics(self, sums: dict[str, float | list[float]]) -> dict[str, float]:
        """The epoch's metrics from its summed statistics: floats, lists for per-class sums."""
        raise NotImplementedError


class Multiclass(Task):
    """Softmax + cross-entropy; accuracy; on validation and test, macro-averaged precision, recall and F1.
    Per-step targets (N, T) are scored at every step."""

    kind = "multiclass"

    def loss(self, output, target, smooth=False):
        k = output.shape[-1]
        # PyTorch spreads its epsilon over all K classes (the true one included): eps_pt = eps * K / (K - 1)
        # leaves exactly 1 - eps on the true class and eps / (K - 1) on each other class.
        eps = self.label_smoothing * k / (k - 1) if smooth and k > 1 else 0.0
        return F.cross_entropy(output.reshape(-1, k), target.reshape(-1), label_smoothing=eps)

    def stats(self, output, target, loss_sum):
        correct = (output.argmax(dim=-1) == target).sum()
        return {"loss": loss_sum, "correct": correct, "count": target.numel()}

    def eval_stats(self, output, target):
        """Per-class counts, shape (K,). One-hot sums, not torch.bincount: on a GPU bincount reads the
        largest index back to the host, a sync per batch."""
        k = output.shape[-1]
        predicted = F.one_hot(output.argmax(dim=-1).reshape(-1), k)
        actual = F.one_hot(target.reshape(-1), k)
        return {"true_positives": (predicted * actual).sum(0), "predicted": predicted.sum(0),
                "actual": actual.sum(0)}

    def metrics(self, sums):
        return _classification_metrics(sums)


class PerStep(Multiclass):
    """A language model's per-character targets: also bits per character and perplexity."""

    kind = "per_step"
    # a macro average over a vocabulary's characters says little about a language model: bpc does
    eval_stats = Task.eval_stats

    def metrics(self, sums):
        out = super().metrics(sums)
        out["bpc"] = out["loss"] / math.log(2)
        out["ppl"] = math.exp(min(out["loss"], 50.0))
        return out


class NodeClassification(Multiclass):
    """Multiclass on the nodes of one graph. Every batch is the whole graph (the network needs all the
    nodes to convolve over them); the target of a node outside the batch's split is -1, and only the
    split's nodes are scored and trained on."""

    kind = "node_classification"

    def loss(self, output, target, smooth=False):
        labelled = target >= 0
        return super().loss(output[labelled], target[labelled], smooth)

    def stats(self, output, target, loss_sum):
        labelled = target >= 0  # loss_sum is the mean loss times every node: recomputed over the split's
        output, target = output[labelled], target[labelled]
        return super().stats(output, target, F.cross_entropy(output, target, reduction="sum"))

    def eval_stats(self, output, target):
        labelled = target >= 0
        return super().eval_stats(output[labelled], target[labelled])


class Binary(Task):
    """Sigmoid + binary cross-entropy on logits; accuracy at threshold 0.5; on validation and test, the
    precision, recall and F1 of the positive class (label 1)."""

    kind = "binary"

    def loss(self, output, target, smooth=False):
        target = target.reshape(output.shape).float()
        if smooth and self.label_smoothing:  # (1, 0) -> (1 - eps, eps), as in the notes
            target = target * (1 - 2 * self.label_smoothing) + self.label_smoothing
        return F.binary_cross_entropy_with_logits(output, target)

    def stats(self, output, target, loss_sum):
        target = target.reshape(output.shape)
        correct = ((output > 0).to(target.dtype) == target).sum()
        return {"loss": loss_sum, "correct": correct, "count": target.numel()}

    def eval_stats(self, output, target):
        predicted, actual = output > 0, target.reshape(output.shape) == 1
        return {"true_positives": (predicted & actual).sum(), "predicted": predicted.sum(),
                "actual": actual.sum()}

    def metrics(self, sums):
        return _classification_metrics(sums)


class Regression(Task):
    """Mean squared error; also MAE and R² (coefficient of determination)."""

    kind = "regression"
    scores_groups = False  # float32 sums of errors round differently over a longer batch: per batch it is

    def loss(self, output, target, smooth=False):
        return F.mse_loss(output.reshape(target.shape), target)

    def stats(self, output, target, loss_sum):  # the loss is the MSE, from the squared errors' sum
        output = output.reshape(target.shape)
        err = output - target
        return {
            "sse": (err * err).sum(),
            "sae": err.abs().sum(),
            "sum_y": target.sum(),
            "sum_y2": (target * target).sum(),
            "count": target.numel(),
        }

    def metrics(self, sums):
        count = max(sums["count"], 1.0)
        mse = sums["sse"] / count
        variance = sums["sum_y2"] / count - (sums["sum_y"] / count) ** 2
        r2 = 1.0 - mse / variance if variance > 1e-12 else float("nan")
        return {"loss": mse, "mse": mse, "mae": sums["sae"] / count, "r2": r2}


@dataclass
class Reconstructed:
    """What a model of an input task returns (dlrun/models/autoencoder.py), for Reconstruction and Generative.

    `x_hat` has the input's shape: the logits of Bernoulli means when `likelihood` is "bernoulli"
    (recon_loss=bce), the means of a unit-variance Gaussian when "gaussian" (recon_loss=mse). `kl` is each
    sample's KL(q(z|x) || p(z)) (a VAE's). `penalty` is the model's own term of the training objective beyond
    the data loss, already weighted (a sparse or contractive autoencoder's; a beta-VAE's (beta - 1) KL).
    """

    x_hat: torch.Tensor
    likelihood: str
    kl: torch.Tensor | None = None
    penalty: torch.Tensor | None = None

    def detach(self) -> Reconstructed:
        """For the epoch's statistics (EpochMetrics keeps outputs detached); they need no penalty."""
        return Reconstructed(self.x_hat.detach(), self.likelihood, None if self.kl is None else self.kl.detach())


class InputTask(Task):
    """A task of the inputs alone: the output is scored against the batch's inputs, and the model's own penalty
    joins the objective. Outputs are Reconstructed records, so a group of steps is scored step by step."""

    scores_groups = False

    def target(self, x, y):
        return x

    def objective(self, output, target, loss):
        return loss if output.penalty is None else loss + output.penalty


class Reconstruction(InputTask):
    """An autoencoder's reconstruction error, per input element: the squared error (recon_loss=mse) or the
    binary cross-entropy (bce) of inputs scaled to [0, 1]."""

    kind = "reconstruction"

    def loss(self, output, target, smooth=False):
        return _element_errors(output, target).mean()

    def stats(self, output, target, loss_sum):
        return {"recon": _element_errors(output, target).sum(), "count": target.numel()}

    def metrics(self, sums):
        recon = sums["recon"] / max(sums["count"], 1.0)
        return {"loss": recon, "recon": recon}


class Generative(InputTask):
    """A VAE's negative ELBO per sample, in nats: the reconstruction term -log p(x|z) summed over the input's
    elements plus KL(q(z|x) || p(z)) (000 §14.3); also bits per input dimension, the negative ELBO / (D ln 2).

    The logged loss is the bound itself (beta = 1): runs of different beta compare on it; beta reaches the
    objective through the model's penalty, (beta - 1) KL."""

    kind = "generative"

    def loss(self, output, target, smooth=False):
        return (_negative_log_likelihood(output, target).flatten(1).sum(1) + output.kl).mean()

    def stats(self, output, target, loss_sum):
        return {"recon": _negative_log_likelihood(output, target).sum(), "kl": output.kl.sum(),
                "samples": len(target), "dims": target.numel()}

    def metrics(self, sums):
        samples = max(sums["samples"], 1.0)
        recon, kl = sums["recon"] / samples, sums["kl"] / samples
        dims = max(sums["dims"], 1.0) / samples
        return {"loss": recon + kl, "recon": recon, "kl": kl, "bpd": (recon + kl) / (dims * math.log(2))}


def _element_errors(output: Reconstructed, target: torch.Tensor) -> torch.Tensor:
    """Each element's reconstruction error: squared, or the cross-entropy against a target clamped to [0, 1]
    (inputs are scaled to [0, 1] with the training split's range: a validation input may lie a little outside)."""
    if output.likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(output.x_hat, target.clamp(0, 1), reduction="none")
    return (output.x_hat - target) ** 2


def _negative_log_likelihood(output: Reconstructed, target: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) of each element: Bernoulli, or a Gaussian of unit variance, 1/2 (x - x_hat)^2 + 1/2 log 2 pi."""
    if output.likelihood == "bernoulli":
        return _element_errors(output, target)
    return 0.5 * _element_errors(output, target) + 0.5 * math.log(2 * math.pi)
class Adversarial(Task):
    """The GAN game (notes 000 §14.4): D ascends log D(x) + log(1 - D(G(z))); G descends its own loss,

    - `minimax`: log(1 - D(G(z))), the game's value as the notes write it. Its gradient with respect to
      D's logit at G(z) is -D(G(z)): it vanishes when D rejects the samples, early in training;
    - `non_saturating` (the default): -log D(G(z)), i.e. G maximizes log D(G(z)) (the notes' §14.4.1
      states the sign wrongly). Its gradient there is -(1 - D(G(z))), about -1 when D rejects them.

    Losses are per sample, from D's logits (D = sigmoid of the logit), computed with softplus so that they
    stay finite when D saturates. The epoch's metrics: `loss` (the generator's, as configured), `d_loss`
    (the discriminator's binary cross-entropy, log 4 ~ 1.386 at the game's equilibrium D = 1/2), and the
    mean D(x) on real data and D(G(z)) on generated data. In training the discriminator's sums come from its
    steps, the generator's from its (one per k discriminator steps).
    """

    kind = "adversarial"
    GENERATOR_LOSSES = ("non_saturating", "minimax")

    def __init__(self, generator_loss: str = "non_saturating"):
        super().__init__()
        if generator_loss not in self.GENERATOR_LOSSES:
            raise ValueError(f"generator_loss must be one of {self.GENERATOR_LOSSES}, not {generator_loss!r}")
        self.minimax = generator_loss == "minimax"

    @staticmethod
    def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """-log D(x) - log(1 - D(G(z))), per sample: what D minimizes."""
        return F.softplus(-real_logits) + F.softplus(fake_logits)

    def generator_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """log(1 - D(G(z))) (minimax) or -log D(G(z)) (non-saturating), per sample: what G minimizes."""
        return -F.softplus(fake_logits) if self.minimax else F.softplus(-fake_logits)

    @staticmethod
    def discriminator_stats(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                            losses: torch.Tensor) -> dict[str, torch.Tensor | int]:
        return {"d_loss": losses.detach().sum(), "d_real": torch.sigmoid(real_logits.detach()).sum(),
                "d_fake": torch.sigmoid(fake_logits.detach()).sum(), "d_count": real_logits.numel()}

    @staticmethod
    def generator_stats(losses: torch.Tensor) -> dict[str, torch.Tensor | int]:
        return {"g_loss": losses.detach().sum(), "g_count": losses.numel()}

    def metrics(self, sums):
        d_count, g_count = max(sums.get("d_count", 0.0), 1.0), max(sums.get("g_count", 0.0), 1.0)
        out = {name: sums[name] / d_count for name in ("d_loss", "d_real", "d_fake") if name in sums}
        if "g_loss" in sums:
            out["loss"] = sums["g_loss"] / g_count
        return out


class Boltzmann(Task):
    """A restricted Boltzmann machine's scores (notes 000 §13; the model trains by contrastive divergence,
    which has no loss of its own): `loss` is the reconstruction error, the mean squared difference per
    visible unit between the visible vector and its mean-field reconstruction p(v | p(h | v)); `pseudo_ll`
    the mean log pseudo-likelihood Σ_i log p(v_i | v_-i) per sample (dlrun/models/rbm.py), in nats."""

    kind = "boltzmann"

    def metrics(self, sums):
        return {"loss": sums["squared_error"] / max(sums["units"], 1.0),
                "pseudo_ll": sums["pseudo_ll"] / max(sums["count"], 1.0)}


def _classification_metrics(sums: dict[str, float | list[float]]) -> dict[str, float]:
    """Loss and accuracy; with `eval_stats`' sums, precision, recall and F1 too: of the one class when the
    counts are scalars (binary), else their macro average (the mean of the per-class F1s, not the F1 of
    the means) over the classes seen in targets or predictions, as scikit-learn's average="macro" does.
    A zero denominator gives 0, as scikit-learn's zero_division=0."""
    count = max(sums["count"], 1.0)
    out = {"loss": sums["loss"] / count, "acc": sums["correct"] / count}
    if "true_positives" in sums:  # validation and test only
        tp, predicted, actual = (
            np.asarray(sums[k], dtype=np.float64) for k in ("true_positives", "predicted", "actual")
        )
        seen = predicted + actual > 0
        per_class = {
            "precision": tp / np.maximum(predicted, 1),  # counts are whole numbers: max(., 1) only guards 0
            "recall": tp / np.maximum(actual, 1),
            "f1": 2 * tp / np.maximum(predicted + actual, 1),  # = 2PR / (P + R)
        }
        out |= {name: float(v[seen].mean()) if seen.any() else 0.0 for name, v in per_class.items()}
    return out


def make_task(spec: DataSpec, label_smoothing: float = 0.0, network: torch.nn.Module | None = None) -> Task:
    """The task of `spec`'s data, or of `network` when it brings its own (`make_task`: the generative
    models, which ignore the data set's targets); refuses label smoothing where it has no meaning."""
    if hasattr(network, "make_task"):
        return network.make_task()
    if label_smoothing:
        _check_label_smoothing(spec, label_smoothing)
    if spec.task == "multiclass":
        return (PerStep if spec.per_step else Multiclass)(label_smoothing)
    if spec.task == "node_classification":
        return NodeClassification(label_smoothing)
    if spec.task == "binary":
        return Binary(label_smoothing)
    if spec.task == "reconstruction":
        return Reconstruction()
    if spec.task == "generative":
        return Generative()
    return Regression()


def _check_label_smoothing(spec: DataSpec, epsilon: float) -> None:
    if spec.task == "regression" or spec.task in INPUT_TASKS:
        raise UserError(
            f"regularizer=label_smoothing softens class targets, and dataset={spec.name} is a {spec.task} task.",
            "Drop label_smoothing for regression; input_noise or weight_noise regularize it.",
            title="Incompatible regularizer and data set",
        )
    k = 2 if spec.task == "binary" else spec.num_outputs
    if epsilon > (k - 1) / k:
        raise UserError(
            f"regularizer.label_smoothing.epsilon = {epsilon:g}: with {k} classes it must be at most "
            f"{(k - 1) / k:.3g}, or the true class gets less probability than each other class.",
            "Use a smaller epsilon, e.g. regularizer.label_smoothing.epsilon=0.1.",
        )
