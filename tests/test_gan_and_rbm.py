"""model=gan (the adversarial task) and model=rbm (contrastive divergence): the losses and their gradients,
real training runs on digits, the two optimizers, resume and a sweep."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from dlrun.errors import UserError
from dlrun.metrics import TASK_METRICS
from dlrun.models.rbm import RBM
from dlrun.run import build_experiment, build_trainer
from dlrun.rundir import RunDir
from dlrun.training.tasks import Adversarial
from tests.test_robustness import StopAt, _assert_same_run, _fit

QUIET = ("callbacks.progress_bar=false", "callbacks.model_summary=false")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _train(compose_cfg, tmp_path, *overrides: str):
    """A real training run in process (dlrun's data, network, module and trainer); the module and data."""
    cfg = compose_cfg(*QUIET, *overrides)
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, _, module = build_experiment(cfg, {})
    trainer, _, _ = build_trainer(cfg, RunDir(tmp_path), {})
    trainer.fit(module, datamodule=datamodule, weights_only=True)
    return module, datamodule, trainer


# --- the GAN's losses ---------------------------------------------------------------------------------
def test_losses_are_the_notes_formulas():
    real, fake = torch.tensor([2.0, -1.0, 0.3], dtype=torch.float64), torch.tensor([-0.5, 1.5, 0.0], dtype=torch.float64)
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    torch.testing.assert_close(Adversarial.discriminator_loss(real, fake), -torch.log(d_real) - torch.log(1 - d_fake))
    torch.testing.assert_close(Adversarial("minimax").generator_loss(fake), torch.log(1 - d_fake))
    torch.testing.assert_close(Adversarial("non_saturating").generator_loss(fake), -torch.log(d_fake))
    with pytest.raises(ValueError, match="generator_loss"):
        Adversarial("wasserstein")


def test_minimax_saturates_where_the_non_saturating_loss_does_not():
    """Where D rejects the samples (D(G(z)) = 1e-4), the gradient reaching the generator through D's logit is
    -D(G(z)) for minimax, vanishing, and -(1 - D(G(z))) for the non-saturating loss, about -1: both push
    D(G(z)) up, only one with force. Checked by autograd, through a generator's weights too."""
    d = 1e-4
    for loss, expected in (("minimax", -d), ("non_saturating", -(1 - d))):
        logit = torch.tensor(math.log(d / (1 - d)), dtype=torch.float64, requires_grad=True)
        Adversarial(loss).generator_loss(logit).backward()
        assert logit.grad.item() == pytest.approx(expected, rel=1e-6), loss
    # a linear generator and a fixed discriminator whose logit at G(z) is about log 1e-4
    torch.manual_seed(0)
    z = torch.randn(64, 4, dtype=torch.float64)
    norms = {}
    for loss in ("minimax", "non_saturating"):
        g = torch.nn.Linear(4, 3, dtype=torch.float64)
        torch.nn.init.zeros_(g.weight)
        torch.nn.init.zeros_(g.bias)
        discriminator_logit = g(z).sum(1) + math.log(d)
        Adversarial(loss).generator_loss(discriminator_logit).mean().backward()
        norms[loss] = torch.linalg.vector_norm(torch.cat([g.weight.grad.flatten(), g.bias.grad]))
    assert norms["non_saturating"] > 1000 * norms["minimax"] > 0


# --- the GAN trains -------------------------------------------------------------------------------------
GAN_RUN = ("model=gan", "model.width=128", "optim.betas=[0.5,0.999]", "callbacks.early_stopping.enabled=false")


@pytest.mark.slow
def test_gan_losses_stay_finite_and_its_samples_look_like_digits(compose_cfg, tmp_path):
    """60 epochs on digits: every logged loss finite, D(x) and D(G(z)) probabilities; a logistic regression
    trained on the real digits is more confident on the generator's samples than on uniform noise images."""
    from sklearn.linear_model import LogisticRegression

    module, datamodule, _ = _train(compose_cfg, tmp_path, *GAN_RUN, "trainer.max_epochs=60")
    rows = list(np.genfromtxt(tmp_path / "metrics.csv", delimiter=",", names=True, dtype=None, encoding=None))
    epochs = [r for r in rows if not math.isnan(float(r["trainloss"]))]
    assert len(epochs) == 60
    for row in epochs:
        for name in ("trainloss", "traind_loss", "valloss", "vald_loss"):
            assert math.isfinite(float(row[name])), name
        assert 0 < float(row["vald_real"]) < 1 and 0 < float(row["vald_fake"]) < 1

    x, y = datamodule.splits["train"]
    classifier = LogisticRegression(max_iter=500).fit(x.flatten(1).numpy(), y.numpy())
    samples = module.network.sample(500, torch.Generator().manual_seed(1))
    assert samples.shape == (500, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    confidence = {name: classifier.predict_proba(images.flatten(1).numpy()).max(1).mean()
                  for name, images in (("samples", samples), ("noise", noise))}
    assert confidence["samples"] > confidence["noise"] + 0.1, confidence


def test_two_optimizers_with_their_rates(compose_cfg):
    """optim.lr is the generator's rate; optim.discriminator_lr, when set, the discriminator's."""
    for extra, expected in (((), 0.001), (("optim.discriminator_lr=0.004",), 0.004)):
        cfg = compose_cfg("model=gan", "optim=adam", *extra)
        _, _, module = build_experiment(cfg, {})
        generator, discriminator = module.configure_optimizers()
        assert {id(p) for g in generator.param_groups for p in g["params"]} == {
            id(p) for p in module.network.generator.parameters()}
        assert {id(p) for g in discriminator.param_groups for p in g["params"]} == {
            id(p) for p in module.network.discriminator.parameters()}
        assert generator.param_groups[0]["lr"] == 0.001 and discriminator.param_groups[0]["lr"] == expected


def test_k_discriminator_steps_per_generator_step(compose_cfg, tmp_path):
    """One epoch of 4 batches with k=2: 4 discriminator steps and 2 generator steps (global_step counts both)."""
    _, _, trainer = _train(compose_cfg, tmp_path, "model=gan", "model.k=2", "dataset.n_train=128",
                           "dataset.batch_size=32", "trainer.max_epochs=1")
    assert trainer.global_step == 6
    for stage in ("train", "val"):  # the task's declared metrics (dlrun/metrics.py), all logged
        assert {f"{stage}/{m.name}" for m in TASK_METRICS["adversarial"]} <= set(trainer.callback_metrics)


def test_gan_refuses_what_acts_on_one_supervised_objective(compose_cfg):
    for overrides, match in ((("regularizer=l2",), "regularizer=l2"), (("scheduler=step",), "schedule")):
        with pytest.raises(UserError, match=match):
            build_experiment(compose_cfg("model=gan", *overrides), {})


def test_gan_resume_equals_the_uninterrupted_run(compose_cfg, tmp_path):
    """Both optimizers' states, the random state and the count of discriminator steps survive: with k=3 and 4
    batches an epoch, generator steps follow batches 3, 6, 9 and 12 (global_step counts both networks' steps:
    5, 5 and 6 an epoch). Stopped mid-epoch 1 and resumed, the run ends bit for bit as the one left alone."""
    cfg = compose_cfg(*QUIET, "model=gan", "model.width=32", "model.k=3", "optim.discriminator_lr=0.002",
                      "dataset.n_train=128", "dataset.batch_size=32", "trainer.max_epochs=3",
                      "trainer.steps_per_execution=1")
    uninterrupted = _fit(cfg, RunDir(tmp_path / "whole"))
    assert uninterrupted["global_step"] == 16
    run_dir = RunDir(tmp_path / "stopped")
    assert _fit(cfg, run_dir, stop=StopAt(9)) == {}
    _assert_same_run(_fit(cfg, run_dir, resume=True), uninterrupted)
    grouped = OmegaConf.merge(cfg, {"trainer": {"steps_per_execution": 3}})
    _assert_same_run(_fit(grouped, RunDir(tmp_path / "grouped")), uninterrupted)


@pytest.mark.slow
def test_grid_sweep_over_gan(run_dlrun):
    """Both architectures (with the minimax loss), each job a process: both complete, with finite losses."""
    result = run_dlrun("-m", "model=gan", "model.arch=mlp,dcgan", "model.generator_loss=minimax",
                       "debug=fast", "trainer.max_epochs=2", "print_config=false", *QUIET)
    summaries = [json.loads(p.read_text()) for p in result.output_dir.glob("sweeps/*/*model.arch=*/summary.json")]
    assert len(summaries) == 2
    for summary in summaries:
        assert summary["status"] == "completed"
        for name in ("test/loss", "test/d_loss", "test/d_real", "test/d_fake"):
            assert math.isfinite(summary["metrics"][name]), name
    assert "test/d_fake" in result.stdout  # the sweep table's headline column


# --- the RBM ------------------------------------------------------------------------------------------
def test_cd_objective_gradient_is_the_cd_update():
    """The gradient of F(v) - F(v_k) with respect to W is -(<v hᵀ>_data - <v hᵀ>_model), h's expectations
    p(h | v) at the data and at the chain's end (000 §13.5)."""
    from dlrun.data.spec import DataSpec

    torch.manual_seed(0)
    rbm = RBM(DataSpec("toy", "multiclass", (6,), 2), hidden=4)
    v = torch.bernoulli(torch.full((10, 6), 0.5))
    v_k = rbm.gibbs(v, 1).detach()
    (rbm.free_energy(v).mean() - rbm.free_energy(v_k).mean()).backward()
    with torch.no_grad():
        positive = v.T @ rbm.hidden_probability(v) / len(v)
        negative = v_k.T @ rbm.hidden_probability(v_k) / len(v)
    torch.testing.assert_close(rbm.weight.grad, -(positive - negative))
    torch.testing.assert_close(rbm.visible_bias.grad, -(v.mean(0) - v_k.mean(0)))


def test_cd1_lowers_the_reconstruction_error(compose_cfg, tmp_path):
    """CD-1 on digits: the validation reconstruction error falls well below the untrained machine's, and the
    pseudo-likelihood rises."""
    cfg = compose_cfg(*QUIET, "model=rbm", "model.cd_k=1", "optim=sgd", "optim.lr=0.1", "trainer.max_epochs=5")
    pl.seed_everything(0, verbose=False)
    datamodule, _, module = build_experiment(cfg, {})
    datamodule.prepare()
    x_val = datamodule.splits["val"][0]
    before = module.network.statistics(x_val, torch.Generator().manual_seed(0))
    trainer, _, _ = build_trainer(cfg, RunDir(tmp_path), {})
    trainer.fit(module, datamodule=datamodule, weights_only=True)
    after = module.network.statistics(x_val, torch.Generator().manual_seed(0))

    def error(stats):
        return float(stats["squared_error"] / stats["units"])

    assert error(after) < 0.6 * error(before), (error(before), error(after))
    assert float(after["pseudo_ll"]) > float(before["pseudo_ll"])
    assert trainer.callback_metrics["val/loss"] == pytest.approx(error(after), rel=1e-5)
    assert {f"val/{m.name}" for m in TASK_METRICS["boltzmann"]} <= set(trainer.callback_metrics)
    samples = module.network.sample(16, torch.Generator().manual_seed(0))
    assert samples.shape == (16, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1


@pytest.mark.slow
def test_gan_trains_under_ddp(run_dlrun):
    """Two CPU processes: each backward reaches every parameter, as DDP's reducer requires."""
    result = run_dlrun("model=gan", "hardware=ddp_cpu", "debug=fast", "trainer.max_epochs=2", *QUIET)
    summary = result.summary()
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert math.isfinite(summary["metrics"]["test/d_loss"])


def test_generative_inputs_are_scaled_to_the_unit_interval_on_both_data_paths(datamodule):
    """Digits' range (0 to 16) maps to [0, 1], whatever dataset.normalize says, in memory
    and streamed alike."""
    batches = {}
    for in_memory in ("true", "false"):
        data = datamodule("digits", f"dataset.in_memory={in_memory}", "dataset.normalize=false")
        data.unit_inputs = True
        data.prepare()
        batches[in_memory] = data.inputs("train", 10_000)
    torch.testing.assert_close(batches["true"], batches["false"])
    assert batches["true"].min() == 0 and batches["true"].max() == 1
