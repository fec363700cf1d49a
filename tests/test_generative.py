"""Autoencoders and the VAE: the reconstruction and generative tasks, their pictures and the sample-quality score."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from dlrun.data.spec import DataSpec
from dlrun.models.autoencoder import VAE, Autoencoder
from dlrun.sample_quality import Classifier, score_images
from dlrun.training.tasks import Generative, Reconstructed, Reconstruction
from tests.conftest import DLRUN, sigterm_after_two_epochs

QUIET = ("print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false")
DIGITS = DataSpec("digits", "reconstruction", (1, 8, 8), 10, tuple(str(i) for i in range(10)))


def _metrics(run_dir) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


# --- the models and the tasks, without training ------------------------------------------------------------


def test_contractive_penalty_is_the_squared_frobenius_norm_of_the_encoders_jacobian():
    torch.manual_seed(0)
    model = Autoencoder(DIGITS, latent_dim=3, width=0, recon_loss="mse", contractive=0.5)
    x = torch.rand(5, 1, 8, 8)
    out = model(x)  # a linear encoder h = W x + b: its Jacobian is W at every x
    weight = model.encoder[1].weight
    assert out.penalty.item() == pytest.approx(0.5 * weight.pow(2).sum().item(), rel=1e-5)
    out.penalty.backward()  # and the penalty trains the weights: d/dW of 0.5 ||W||^2 = W
    assert torch.allclose(weight.grad, weight.detach(), atol=1e-6)


def test_sparse_penalty_is_l1_of_the_code_and_denoising_noise_reaches_the_encoder_only_while_training():
    torch.manual_seed(0)
    model = Autoencoder(DIGITS, latent_dim=4, width=16, sparsity=0.1, input_noise=0.5)
    x = torch.rand(6, 1, 8, 8)
    model.eval()
    assert model(x).penalty is None  # evaluation scores the reconstruction alone
    first, second = model(x).x_hat, model(x).x_hat
    assert torch.equal(first, second)  # no noise at evaluation
    model.train()
    torch.manual_seed(1)
    noisy = x + 0.5 * torch.randn_like(x)
    torch.manual_seed(1)
    out = model(x)
    code = model.encoder(noisy)
    assert torch.allclose(out.x_hat, model.decoder(code), atol=1e-6)
    assert out.penalty.item() == pytest.approx(0.1 * code.abs().sum(1).mean().item(), rel=1e-5)
    # the target stays the clean input: the task scores against x, not against the noisy input
    assert torch.equal(Reconstruction().target(x, torch.zeros(6)), x)


def test_vae_kl_matches_torch_distributions_and_bpd_is_the_negative_elbo_per_dimension_in_bits():
    torch.manual_seed(0)
    model = VAE(DIGITS, latent_dim=3, width=16).eval()
    x = torch.rand(4, 1, 8, 8)
    out = model(x)
    mu, log_var = model.posterior(x)
    q = torch.distributions.Normal(mu, (0.5 * log_var).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(out.kl, torch.distributions.kl_divergence(q, p).sum(1), atol=1e-5)
    task = Generative()
    sums = {k: float(v) for k, v in task.stats(out.detach(), x, torch.tensor(0.0)).items()}
    metrics = task.metrics(sums)
    assert metrics["loss"] == pytest.approx(task.loss(out, x).item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(metrics["recon"] + metrics["kl"])
    assert metrics["bpd"] == pytest.approx(metrics["loss"] / (64 * math.log(2)))
    # beta enters the objective only: (beta - 1) KL on top of the negative ELBO
    beta = VAE(DIGITS, latent_dim=3, width=16, beta=4.0).train()
    torch.manual_seed(2)
    out = beta(x)
    assert out.penalty.item() == pytest.approx(3.0 * out.kl.mean().item(), rel=1e-5)
    objective = task.objective(out, x, task.loss(out, x))
    expected = (torch.nn.functional.binary_cross_entropy_with_logits(out.x_hat, x, reduction="none").flatten(1).sum(1)
                + 4.0 * out.kl).mean()
    assert objective.item() == pytest.approx(expected.item(), rel=1e-5)


def test_conv_encoder_and_decoder_restore_odd_image_sizes():
    spec = DataSpec("mnist", "generative", (1, 28, 28), 10)
    for model in (VAE(spec, latent_dim=4, architecture="conv", channels=[4, 8, 8]),
                  Autoencoder(spec, latent_dim=4, architecture="conv", channels=[4, 8, 8])):
        assert model(torch.rand(2, 1, 28, 28)).x_hat.shape == (2, 1, 28, 28)  # 28 -> 14 -> 7 -> 4 -> 7 -> 14 -> 28


def test_reconstruction_error_is_per_element_and_bce_clamps_targets_outside_the_unit_range():
    x_hat = torch.tensor([[0.0, 2.0]])
    target = torch.tensor([[0.5, 1.2]])  # a validation input a little above the training split's maximum
    task = Reconstruction()
    mse = task.loss(Reconstructed(x_hat, "gaussian"), target)
    assert mse.item() == pytest.approx((0.25 + 0.64) / 2)
    bce = task.loss(Reconstructed(x_hat, "bernoulli"), target)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(x_hat, torch.tensor([[0.5, 1.0]]))
    assert bce.item() == pytest.approx(expected.item())


def test_sample_quality_scores_confidence_and_the_entropy_of_the_predicted_classes():
    classifier = Classifier(DataSpec("toy", "generative", (2,), 3, ("a", "b", "c")))
    with torch.no_grad():  # a fixed judge: class k when feature 0 is large, scaled by feature 1
        layer_in, _, layer_out = classifier.model
        layer_in.weight.zero_(), layer_in.bias.zero_(), layer_out.weight.zero_()
        layer_in.weight[0, 0] = 1.0
        layer_out.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
        layer_out.weight[:, 0] = torch.tensor([100.0, 0.0, -100.0])
    one_class = score_images(classifier.model, torch.tensor([[1.0, 0.0]] * 8))
    assert one_class["confidence"] == pytest.approx(1.0) and one_class["class_entropy"] == 0.0
    assert one_class["max_class_entropy"] == pytest.approx(math.log2(3))


# --- real training runs ------------------------------------------------------------------------------------


def test_unit_inputs_scale_digits_by_their_range_and_other_data_by_the_training_split(datamodule):
    digits = datamodule("digits")
    digits.unit_inputs = True
    digits.prepare()
    from sklearn.datasets import load_digits

    assert torch.equal(torch.sort(digits.splits["train"][0].flatten().unique()).values,
                       torch.tensor(sorted(set(load_digits().images.flatten() / 16.0)), dtype=torch.float32))
    moons = datamodule("moons")
    moons.unit_inputs = True
    moons.prepare()
    train = moons.splits["train"][0]
    assert torch.allclose(train.amin(0), torch.zeros(2)) and torch.allclose(train.amax(0), torch.ones(2))


@pytest.mark.slow
def test_linear_autoencoder_reaches_the_reconstruction_error_of_pca(run_dlrun, datamodule):
    d = 4
    result = run_dlrun(*QUIET, "model=autoencoder", "model.width=0", f"model.latent_dim={d}", "model.recon_loss=mse",
                       "optim.lr=0.02", "trainer.max_epochs=30", "callbacks=no_early_stopping", timeout=1500)
    # PCA with d components, fitted on the same training split scaled the same way, scored on the test split
    data = datamodule("digits")
    data.unit_inputs = True
    data.prepare()
    train, test = (data.splits[s][0].flatten(1).double().numpy() for s in ("train", "test"))
    mean = train.mean(0)
    _, _, components = np.linalg.svd(train - mean, full_matrices=False)
    basis = components[:d]
    pca_error = float((((test - mean) @ basis.T @ basis + mean - test) ** 2).mean())
    autoencoder_error = result.summary()["metrics"]["test/recon"]
    assert autoencoder_error <= 1.05 * pca_error, (autoencoder_error, pca_error)
    assert (result.run_dir / "reconstructions.png").exists() and not (result.run_dir / "samples.png").exists()


@pytest.mark.slow
def test_vae_elbo_improves_its_kl_is_positive_and_samples_differ(run_dlrun):
    result = run_dlrun(*QUIET, "model=vae", "model.latent_dim=2", "dataset.n_train=600", "trainer.max_epochs=6",
                       "callbacks=no_early_stopping", timeout=1500)
    rows = _metrics(result.run_dir)
    assert rows[-1]["val/loss"] < rows[0]["val/loss"] - 1.0  # nats per image
    assert all(r["val/kl"] > 0 and r["train/kl"] > 0 for r in rows)
    assert all(r["val/loss"] == pytest.approx(r["val/recon"] + r["val/kl"], rel=1e-5) for r in rows)
    summary = result.summary()
    assert {"test/loss", "test/recon", "test/kl", "test/bpd"} <= set(summary["metrics"])
    for picture in ("samples.png", "reconstructions.png", "latent.png", "curves.png"):
        assert (result.run_dir / picture).stat().st_size > 0, picture
    quality = summary["sample_quality"]
    assert 0 < quality["confidence"] <= 1 and 0 <= quality["class_entropy"] <= quality["max_class_entropy"]
    assert quality["classifier_test_acc"] > 0.8 and quality["noise_confidence"] < 0.3
    # the classifier is cached in the data directory and reused
    (cached,) = (result.output_dir.parent / "data" / "sample_quality").glob("digits-*.pt")
    assert torch.load(cached, weights_only=True)["test_acc"] == quality["classifier_test_acc"]
    # samples of the trained model differ from each other
    state = torch.load(result.run_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    model = VAE(DataSpec("digits", "generative", (1, 8, 8), 10), latent_dim=2)
    model.load_state_dict({k.removeprefix("network."): v for k, v in state.items()})
    samples = model.eval().sample(16, generator=torch.Generator().manual_seed(0)).flatten(1)
    distances = torch.cdist(samples, samples)
    assert distances[~torch.eye(16, dtype=torch.bool)].min() > 1e-3
    # dlrun-eval rebuilds the run (the VAE sets its task again) and scores it
    evaluated = subprocess.run([sys.executable, "-m", "dlrun.evaluate", str(result.run_dir)], capture_output=True,
                               text=True, timeout=600, cwd=result.output_dir.parent)
    assert evaluated.returncode == 0 and "bpd" in evaluated.stdout, evaluated.stdout + evaluated.stderr


@pytest.mark.slow
def test_debug_fast_runs_the_conv_autoencoder_with_every_penalty(run_dlrun):
    """(The plain autoencoder and the VAE run with debug=fast in tests/test_models.py, and draw their
    reconstructions in the training runs above.)"""
    result = run_dlrun("debug=fast", "model=autoencoder", "model.architecture=conv", "model.sparsity=0.01",
                       "model.input_noise=0.1", "model.contractive=0.01", "model.recon_loss=mse")
    assert result.summary()["status"] == "completed"
    assert (result.run_dir / "reconstructions.png").exists()


def test_refusals_name_the_model_and_what_to_do(run_dlrun):
    refused = (("model=vae", "regularizer=label_smoothing"),
               ("model=autoencoder", "dataset=moons", "model.architecture=conv"))
    with ThreadPoolExecutor(max_workers=2) as pool:  # both at once: each imports torch before it is refused
        vae, conv = pool.map(lambda args: run_dlrun(*QUIET, *args, "debug=fast", check=False), refused)
    assert vae.returncode == 2 and "label_smoothing" in vae.stdout + vae.stderr
    assert "Traceback" not in vae.stderr
    assert conv.returncode == 2 and "architecture=mlp" in (conv.stdout + conv.stderr).replace("\n", "")


@pytest.mark.slow
def test_vae_resumes_after_sigterm_like_the_run_left_alone(tmp_path):
    args = [*DLRUN, *QUIET, "model=vae", "dataset.n_train=300", "dataset.batch_size=32", "callbacks=no_early_stopping",
            "trainer.max_epochs=5"]
    env = {**os.environ, "COLUMNS": "200", "DLRUN_DATA_DIR": str(tmp_path / "data")}
    env.pop("HYDRA_FULL_ERROR", None)
    alone = subprocess.run(args, env={**env, "DLRUN_OUTPUT_DIR": str(tmp_path / "alone")}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=1500)
    assert alone.returncode == 0, alone.stderr
    out = tmp_path / "killed"
    code, _, stderr = sigterm_after_two_epochs(args, {**env, "DLRUN_OUTPUT_DIR": str(out)}, out)
    assert code == 128 + signal.SIGTERM, stderr
    (run_dir,) = [p.parent for p in out.glob("runs/*/*/config.yaml")]
    resumed = subprocess.run([*DLRUN, f"resume={run_dir}"], env={**env, "DLRUN_OUTPUT_DIR": str(out)}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=1500)
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads((run_dir / "summary.json").read_text())
    (alone_dir,) = [p.parent for p in (tmp_path / "alone").glob("runs/*/*/config.yaml")]
    reference = json.loads((alone_dir / "summary.json").read_text())
    assert final["status"] == "completed" and len(final["resumed"]) == 1
    for key in ("metrics", "last_epoch", "best_value", "best_epoch", "epochs", "global_step", "sample_quality"):
        assert final[key] == reference[key], key
    assert (run_dir / "metrics.csv").read_text() == (alone_dir / "metrics.csv").read_text()


@pytest.mark.slow
def test_grid_sweep_over_vae_beta(run_dlrun):
    result = run_dlrun("-m", "model=vae", "model.beta=0.5,2.0", "debug=fast", "dataset.n_train=200")
    (sweep_dir,) = sorted(p for p in (result.output_dir / "sweeps").iterdir() if p.is_dir())
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [r["model.beta"] for r in rows] == ["0.5", "2.0"]
    assert all(r["status"] == "completed" for r in rows)
    document = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert all({"test/loss", "test/kl", "test/bpd"} <= set(job["test"]) for job in document["jobs"])
