"""Training the generative models that score themselves: a GAN (two optimizers, k discriminator steps per
generator step) and an RBM (contrastive divergence). Their tasks (tasks.py: Adversarial, Boltzmann) have no
loss of a network's output against a target: the loop computes the task's sums and `EpochMetrics.record`s
them, and everything else (grouped execution, checkpoints, resume, epoch metrics, loggers) is Experiment's.

Regularizers and, for the GAN, schedulers and gradient accumulation act on one supervised objective and
one optimizer; these models refuse them. Validation and test draw their noise (the GAN's z, the RBM's
pseudo-likelihood units) from a generator seeded afresh at each pass: every epoch is scored on the same
draws, and the training run's random state is untouched, so a resumed run trains exactly as the original.
"""

from __future__ import annotations

import torch

from dlrun.errors import UserError
from dlrun.training.module import Experiment
from dlrun.training.tasks import Task

#: the seed of each validation and test pass's noise
EVALUATION_SEED = 0


class SelfScoredExperiment(Experiment):
    """An Experiment whose evaluation batches are scored by `evaluation_statistics` (the task's sums)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.regularizers:
            names = ", ".join(r.name for r in self.regularizers)
            raise UserError(f"regularizer={names}: model={type(self.network).__name__.lower()} trains without "
                            "the supervised loss the regularizers act on.",
                            "Drop the regularizer (regularizer=none); optim.weight_decay decays the weights.",
                            title="Incompatible regularizer and model")
        self._noise: torch.Generator | None = None

    def evaluation_statistics(self, x: torch.Tensor) -> dict[str, torch.Tensor | int]:
        raise NotImplementedError

    def _start_evaluation(self) -> None:
        self.metrics.start_evaluation()
        self._noise = torch.Generator(self.device).manual_seed(EVALUATION_SEED)

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def validation_step(self, batch, batch_idx):
        self.metrics.record("val", self.evaluation_statistics(batch[0]))

    def test_step(self, batch, batch_idx):
        self.metrics.record("test", self.evaluation_statistics(batch[0]))


class AdversarialExperiment(SelfScoredExperiment):
    """A GAN (dlrun/models/gan.py) trained as in the notes' algorithm (000 §14.4.1): every training batch
    makes one discriminator step (the real batch against as many generated samples, the generator held
    fixed); every `model.k`-th batch of the run is followed by one generator step on fresh noise.

    Two optimizers of the optim group's class and knobs, the generator's first: `optim.lr` is the
    generator's rate and the discriminator's unless `optim.discriminator_lr` is set. trainer.global_step
    and trainer.max_steps count the steps of both; the logged step count counts batches. train/grad_norm
    averages the norms of both networks' steps, each over its own parameters.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.schedule is not None:
            raise UserError("model=gan trains two optimizers; a learning-rate schedule drives one.",
                            "Use scheduler=none with model=gan.", title="Incompatible scheduler and model")
        self._discriminator_steps = 0  # of the run (saved in checkpoints): every k-th is followed by a generator step

    def on_train_start(self) -> None:
        super().on_train_start()
        if self._execution.accumulate_grad_batches > 1:
            raise UserError("trainer.accumulate_grad_batches > 1: model=gan alternates two optimizers "
                            "batch by batch, and accumulating would mix their gradients.",
                            "Raise dataset.batch_size instead.", title="Incompatible trainer setting and model")

    def configure_optimizers(self):
        if self.make_optimizer is None:
            raise RuntimeError("this Experiment was built to be evaluated: it has no optimizer to train with")
        make = self.make_optimizer
        make_discriminator = getattr(make, "for_discriminator", make)  # OptimizerFactory's; a plain callable: the same
        return [make(self.network.generator.parameters()),
                make_discriminator(self.network.discriminator.parameters())]

    def training_step(self, batch, batch_idx):
        """Return the discriminator's loss of each of its steps, for DivergenceGuard."""
        generator_optimizer, discriminator_optimizer = self.optimizers()
        execution, task, gan = self._execution, self.task, self.network
        # Under DDP every backward must reach every parameter (the reducer waits for all of them), so the
        # discriminator's step backpropagates into G too; the generator's step discards that gradient.
        detach = self.trainer.world_size == 1
        losses = []
        for i, (x, _) in enumerate(execution.batches_of(batch)):
            if i and self._interruption is not None and self._interruption.signum is not None:
                break
            if execution.max_steps_reached(self.trainer):
                break
            fake = gan.generator(gan.noise(len(x), x.device))
            fake = fake.detach() if detach else fake
            real_logits, fake_logits = gan(x), gan(fake)
            per_sample = task.discriminator_loss(real_logits, fake_logits)
            loss = per_sample.mean()
            execution.backward(self, loss, loss.detach(), discriminator_optimizer)
            execution.step(self, discriminator_optimizer)
            self.metrics.record("train", task.discriminator_stats(real_logits, fake_logits, per_sample))
            losses.append(loss.detach())
            self._discriminator_steps += 1
            if self._discriminator_steps % gan.k == 0:
                per_sample = task.generator_loss(gan(gan.generator(gan.noise(len(x), x.device))))
                loss = per_sample.mean()
                execution.backward(self, loss, loss.detach(), generator_optimizer)
                execution.step(self, generator_optimizer)
                self.metrics.record("train", task.generator_stats(per_sample))
        self.metrics.flush("train")
        execution.count_logged_steps(self.trainer, len(losses))
        return torch.stack(losses) if losses else None

    def evaluation_statistics(self, x):
        task, gan = self.task, self.network
        real_logits = gan(x)
        fake_logits = gan(gan.generator(gan.noise(len(x), x.device, self._noise)))
        return (task.discriminator_stats(real_logits, fake_logits, task.discriminator_loss(real_logits, fake_logits))
                | task.generator_stats(task.generator_loss(fake_logits)))

    def on_before_optimizer_step(self, optimizer) -> None:
        """The stepping network's gradients only: the other's are stale or a by-product of backward."""
        self.metrics.add_gradient_norms([p for group in optimizer.param_groups for p in group["params"]])

    def on_train_epoch_start(self) -> None:
        self._epoch_lr = self.optimizers()[0].param_groups[0]["lr"]  # the generator's

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["discriminator_steps"] = self._discriminator_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._discriminator_steps = int(checkpoint.get("discriminator_steps", 0))


class ContrastiveDivergence(SelfScoredExperiment):
    """An RBM (dlrun/models/rbm.py) trained by CD-k: the training objective is the free-energy difference
    whose gradient is the CD update; the logged training loss is the batch's reconstruction error."""

    def training_objective(self, x, y):
        rbm = self.network
        objective = rbm.contrastive_divergence(x)
        stats = rbm.statistics(x)
        self.metrics.record("train", stats)
        return objective, stats["squared_error"] / stats["units"]

    def evaluation_statistics(self, x):
        return self.network.statistics(x, self._noise)


def experiment_class(task: Task) -> type[Experiment]:
    """The LightningModule that trains a network on `task`."""
    return {"adversarial": AdversarialExperiment, "boltzmann": ContrastiveDivergence}.get(task.kind, Experiment)
