"""Regularizers against hand computation (closed form, autograd), their wiring into a training step,
the notes' L1-sparsity claim, and a smoke run of every optimizer, schedule and regularizer option."""

from __future__ import annotations

import copy
import math
import tempfile

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlrun.config import validate
from dlrun.data.spec import DataSpec
from dlrun.docs import group_options
from dlrun.errors import UserError
from dlrun.models.base import build_network
from dlrun.models.mlp import MLP
from dlrun.run import build_experiment, build_trainer
from dlrun.rundir import RunDir
from dlrun.training import regularizers as R
from dlrun.training.metrics import NEAR_ZERO
from dlrun.training.module import Experiment
from dlrun.training.tasks import make_task

FLAT = DataSpec("toy", "multiclass", (6,), 3)


def experiment(network: nn.Module, regs=(), spec: DataSpec = FLAT, **task_kwargs) -> Experiment:
    return Experiment(network, make_task(spec, **task_kwargs), regularizers=regs)


def batch(n: int = 16, spec: DataSpec = FLAT, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *spec.input_shape, generator=g), torch.randint(
        0, spec.num_outputs, (n,), generator=g
    )


def grads_of_training_step(module: Experiment, data) -> dict[str, torch.Tensor]:
    module.network.zero_grad()
    module.training_objective(*data)[0].backward()
    return {name: p.grad.clone() for name, p in module.network.named_parameters()}


def train_metrics(module: Experiment) -> dict[str, float]:
    """The training epoch's metrics so far, as the module would log them."""
    return module.metrics.compute("train")


# --- weight penalties -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "knobs", "extra_grad"),
    [
        ("l1", {"alpha": 0.1}, lambda w: 0.1 * torch.sign(w)),
        ("l2", {"alpha": 0.1}, lambda w: 0.1 * w),
        ("elastic", {"l1": 0.1, "l2": 0.2}, lambda w: 0.1 * torch.sign(w) + 0.2 * w),
    ],
)
def test_penalties_add_their_gradient_to_weights_only(compose_cfg, option, knobs, extra_grad):
    overrides = [f"regularizer.{option}.{k}={v}" for k, v in knobs.items()]
    reg = OmegaConf.to_object(compose_cfg(f"regularizer=[{option}]", *overrides).regularizer)[option]
    reg = R.__dict__[reg["_target_"].rsplit(".", 1)[1]](**{k: v for k, v in reg.items() if k != "_target_"})
    torch.manual_seed(0)
    net = MLP(FLAT, width=5, depth=1, batch_norm=True)
    data = batch()
    plain = grads_of_training_step(experiment(net), data)
    penalized = grads_of_training_step(experiment(net, [reg]), data)
    for name, p in net.named_parameters():
        expected = extra_grad(p.detach()) if p.dim() > 1 else torch.zeros_like(p)  # biases, batch-norm spared
        torch.testing.assert_close(penalized[name] - plain[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_penalty_values_and_the_logged_penalty():
    net = MLP(FLAT, width=4, depth=1)
    weights = [p for p in net.parameters() if p.dim() > 1]
    l1 = sum(w.abs().sum() for w in weights).item()
    l2 = sum((w * w).sum() for w in weights).item()
    assert R.L1(alpha=0.5).penalty(net).item() == pytest.approx(0.5 * l1, rel=1e-6)
    assert R.L2(alpha=0.5).penalty(net).item() == pytest.approx(0.25 * l2, rel=1e-6)
    assert R.ElasticNet(l1=0.5, l2=0.5).penalty(net).item() == pytest.approx(0.5 * l1 + 0.25 * l2, rel=1e-6)
    module = experiment(net, [R.L1(alpha=0.5), R.L2(alpha=0.5)])
    module.training_objective(*batch())
    module.training_objective(*batch(seed=1))
    assert train_metrics(module)["train/penalty"] == pytest.approx(0.5 * l1 + 0.25 * l2, rel=1e-6)


# --- constraints on weights and gradients -----------------------------------------------------------------
def test_max_norm_clamps_each_units_incoming_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(8, 6))
    with torch.no_grad():
        net[0].weight.mul_(10)
        net[2].weight[:3].mul_(100)  # three rows far above c, three left as they are (below c)
    small_rows = net[2].weight[3:].detach().clone()
    R.MaxNorm(c=3.0).on_after_optimizer_step(net)
    assert net[0].weight.flatten(1).norm(dim=1).max() <= 3.0 + 1e-5  # one norm per output channel
    row_norms = net[2].weight.norm(dim=1)
    assert row_norms.max() <= 3.0 + 1e-5 and row_norms[:3].min() > 2.99
    torch.testing.assert_close(net[2].weight[3:], small_rows)


def test_grad_clip_by_norm_rescales_the_global_gradient_and_keeps_its_direction():
    net = nn.Linear(4, 3)
    grads = [torch.randn_like(p) * 10 for p in net.parameters()]
    for p, g in zip(net.parameters(), grads, strict=True):
        p.grad = g.clone()
    total = torch.sqrt(sum((g * g).sum() for g in grads))
    R.GradClip(threshold=1.0).on_before_optimizer_step(net)
    clipped = torch.sqrt(sum((p.grad * p.grad).sum() for p in net.parameters()))
    assert clipped <= 1.0 + 1e-5
    for p, g in zip(net.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g / total, rtol=1e-5, atol=1e-6)  # g <- tau g / ||g||
    before = [p.grad.clone() for p in net.parameters()]
    R.GradClip(threshold=5.0).on_before_optimizer_step(net)  # ||g|| = 1 <= tau: untouched
    for p, b in zip(net.parameters(), before, strict=True):
        torch.testing.assert_close(p.grad, b)


def test_grad_clip_by_value_bounds_every_element():
    net = nn.Linear(4, 3)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 10
    R.GradClip(threshold=0.5, algorithm="value").on_before_optimizer_step(net)
    assert max(p.grad.abs().max().item() for p in net.parameters()) <= 0.5


def test_logged_grad_norm_is_the_norm_before_clipping():
    net = nn.Linear(4, 3)
    module = experiment(net, [R.GradClip(threshold=0.1)])
    module.training_objective(*batch(spec=DataSpec("toy", "multiclass", (4,), 3)))  # the step's loss
    for p in net.parameters():
        p.grad = torch.full_like(p, 2.0)
    module.on_before_optimizer_step(None)
    assert train_metrics(module)["train/grad_norm"] == pytest.approx(2.0 * math.sqrt(15), rel=1e-6)
    assert torch.sqrt(sum((p.grad**2).sum() for p in net.parameters())).item() == pytest.approx(0.1, rel=1e-5)


# --- dropout --------------------------------------------------------------------------------------------
def test_dropout_sets_input_and_hidden_probabilities(compose_cfg):
    cfg = compose_cfg("regularizer=[dropout]")
    reg = R.Dropout(**{k: v for k, v in cfg.regularizer.dropout.items() if k != "_target_"})
    net = build_network(cfg.model, FLAT, "mlp", reg.model_overrides())
    probabilities = [m.p for m in net.modules() if isinstance(m, nn.Dropout)]
    assert probabilities == [0.2, 0.5, 0.5]  # input first, then after each of the two hidden layers


def test_dropout_is_active_in_training_identity_in_evaluation_and_keeps_the_expectation():
    torch.manual_seed(0)
    layer = nn.Dropout(0.5)
    h = torch.rand(200) + 0.5
    layer.train()
    samples = layer(h.expand(4000, 200))
    dropped = (samples == 0).float().mean().item()
    assert dropped == pytest.approx(0.5, abs=0.01)
    kept = samples[samples != 0]
    torch.testing.assert_close(
        kept, (h.expand(4000, 200) * 2)[samples != 0]
    )  # inverted: kept units / keep prob
    # E[dropout(h)] = h: the mean of 4000 masks is within ~4 standard errors of h for every unit
    assert ((samples.mean(0) - h).abs() < 4 * h / math.sqrt(4000)).all()
    layer.eval()
    torch.testing.assert_close(layer(h), h)
    net = MLP(FLAT, width=16, depth=2, dropout=0.5, input_dropout=0.2)
    x = batch()[0]
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    torch.testing.assert_close(net(x), net(x))


# --- label smoothing and the catalog's reference values ---------------------------------------------------
def test_catalog_reference_values():
    scores = torch.tensor([[3.0, 1.0, -1.0, -1.0]])
    task = make_task(DataSpec("toy", "multiclass", (2,), 4))
    # "label 1" is the notes' first class (they count from 1); dlrun, like PyTorch, counts from 0
    assert task.loss(scores, torch.tensor([0])).item() == pytest.approx(
        0.1587, abs=1e-4
    )  # the catalog's 0.16
    assert task.loss(scores, torch.tensor([1])).item() == pytest.approx(2.1587, abs=1e-4)  # index 1: not 0.16
    assert task.loss(torch.zeros(1, 4), torch.tensor([2])).item() == pytest.approx(math.log(4))  # 1.386
    probabilities = torch.softmax(torch.tensor([5.0, 2.0, -1.0, 3.0]), dim=0)
    torch.testing.assert_close(probabilities, torch.tensor([0.842, 0.042, 0.002, 0.114]), atol=5e-4, rtol=0)


def test_label_smoothing_loss_equals_the_hand_computed_value():
    scores = torch.tensor([[3.0, 1.0, -1.0, -1.0], [0.5, 2.0, 0.0, -2.0]])
    target = torch.tensor([0, 1])
    task = make_task(DataSpec("toy", "multiclass", (2,), 4), label_smoothing=0.1)
    soft = torch.full(
        (2, 4), 0.1 / 3
    )  # the notes (003): 1 - eps on the true class, eps / (K - 1) on the others
    soft[0, 0] = soft[1, 1] = 0.9
    expected = -(soft * torch.log_softmax(scores, dim=1)).sum(1).mean()
    assert task.loss(scores, target, smooth=True).item() == pytest.approx(expected.item(), rel=1e-6)
    assert task.loss(scores, target).item() == pytest.approx(
        -torch.log_softmax(scores, 1)[[0, 1], [0, 1]].mean().item(), rel=1e-6
    )
    binary = make_task(DataSpec("toy", "binary", (2,), 1), label_smoothing=0.1)
    z = torch.tensor([[1.5], [-0.5]])
    p = torch.sigmoid(z).squeeze(1)
    soft_y = torch.tensor([0.9, 0.1])  # labels (1, 0) -> (1 - eps, eps)
    expected = -(soft_y * torch.log(p) + (1 - soft_y) * torch.log(1 - p)).mean()
    assert binary.loss(z, torch.tensor([1.0, 0.0]), smooth=True).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_label_smoothing_shapes_the_objective_but_not_the_logged_loss():
    net = MLP(FLAT, width=8, depth=1)
    data = batch()
    module = experiment(net, [R.LabelSmoothing(0.2)], **R.LabelSmoothing(0.2).task_overrides())
    objective, _ = module.training_objective(*data)
    logged = train_metrics(module)["train/loss"]
    out = net(data[0])
    assert objective.item() == pytest.approx(module.task.loss(out, data[1], smooth=True).item(), rel=1e-6)
    assert logged == pytest.approx(nn.functional.cross_entropy(out, data[1]).item(), rel=1e-6)


def test_label_smoothing_is_refused_where_it_has_no_meaning():
    with pytest.raises(UserError, match="regression"):
        make_task(DataSpec("toy", "regression", (2,), 1), label_smoothing=0.1)
    with pytest.raises(UserError, match="at most 0.5"):
        make_task(DataSpec("toy", "binary", (2,), 1), label_smoothing=0.6)


# --- noise and augmentation -------------------------------------------------------------------------------
def test_input_noise_adds_gaussian_noise_of_std_sigma_to_training_inputs_only():
    x, y = torch.zeros(4000, 10), torch.arange(4000)
    noisy, same_y = R.InputNoise(sigma=0.3).transform_batch(x, y)
    assert noisy.std().item() == pytest.approx(0.3, rel=0.02) and noisy.mean().abs() < 0.01
    assert torch.equal(same_y, y) and torch.equal(x, torch.zeros(4000, 10))  # the batch itself is untouched
    with pytest.raises(UserError, match="token"):
        R.InputNoise().transform_batch(torch.zeros(2, 5, dtype=torch.long), y[:2])


def test_weight_noise_perturbs_the_forward_pass_only_and_takes_the_gradient_there():
    torch.manual_seed(0)
    net = MLP(FLAT, width=8, depth=1)
    reg = R.WeightNoise(sigma=0.1)
    module = experiment(net, [reg])
    x, y = batch()
    before = copy.deepcopy(net.state_dict())
    torch.manual_seed(1)
    grads = grads_of_training_step(module, (x, y))
    for name, value in net.state_dict().items():  # nothing to undo: the weights never changed
        assert torch.equal(value, before[name])
    assert not torch.equal(module._training_forward(x), module._training_forward(x))
    # the same noise, applied by hand to a copy, gives the same gradient
    torch.manual_seed(1)
    deltas = reg.weight_perturbation(net)
    noisy = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            p.add_(deltas.get(name, torch.zeros_like(p)))
    nn.functional.cross_entropy(noisy(x), y).backward()
    for name, p in noisy.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert set(deltas) == {n for n, p in net.named_parameters() if p.dim() > 1}


def augment_only(**on) -> R.Augment:
    knobs = {"crop_padding": 0, "flip": False, "degrees": 0.0, "scale": 0.0, "brightness": 0.0,
             "contrast": 0.0, "cutout": 0, "sigma": 0.0}
    return R.Augment(**{**knobs, **on})


def image_batch(n: int = 32) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(1, 2, 8, 6).repeat(n, 1, 1, 1)  # n copies of one non-square image


def test_augment_keeps_shapes_is_reproducible_and_differs_between_samples():
    x, y = image_batch(), torch.zeros(32, dtype=torch.long)
    aug = R.Augment(flip=True)
    torch.manual_seed(0)
    a, a_y = aug.transform_batch(x, y)
    torch.manual_seed(0)
    b, _ = aug.transform_batch(x, y)
    assert a.shape == x.shape and torch.equal(a, b) and torch.equal(a_y, y)
    distinct = {tuple(sample.flatten().tolist()) for sample in a}
    assert len(distinct) == len(a)  # every copy of the same image came out different
    for shape in ((32, 5, 3), (32, 7)):  # sequences and vectors: shape kept, noise only
        s = torch.randn(shape)
        out, _ = aug.transform_batch(s, y)
        assert out.shape == s.shape and not torch.equal(out, s)
        assert torch.equal(
            augment_only(crop_padding=2, flip=True, degrees=30, brightness=0.5, contrast=0.5, cutout=3)
            .transform_batch(s, y)[0], s
        )
    with pytest.raises(UserError, match="token"):
        aug.transform_batch(torch.zeros(2, 5, dtype=torch.long), y[:2])


def test_augment_flip_mirrors_about_half_the_samples():
    x = image_batch()
    out, _ = augment_only(flip=True).transform_batch(x, torch.zeros(32))
    mirrored = [torch.allclose(o, x[0].flip(-1), atol=1e-5) for o in out]
    kept = [torch.allclose(o, x[0], atol=1e-5) for o in out]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True)) and any(mirrored) and any(kept)


def test_augment_crop_is_a_shift_of_at_most_the_padding_with_zero_fill():
    x = image_batch()
    out, _ = augment_only(crop_padding=1).transform_batch(x, torch.zeros(32))
    padded = nn.functional.pad(x[0], (1, 1, 1, 1))
    crops = [padded[:, dy : dy + 8, dx : dx + 6] for dy in range(3) for dx in range(3)]
    seen = {next(i for i, c in enumerate(crops) if torch.allclose(o, c, atol=1e-5)) for o in out}
    assert len(seen) > 3  # every output is one of the 9 crops, and several different ones occur


def test_augment_cutout_zeroes_one_square_per_sample():
    x = image_batch() + 10  # no zeros in the image itself
    out, _ = augment_only(cutout=3).transform_batch(x, torch.zeros(32))
    for o in out:
        zeroed = (o == 0).all(0)  # all channels of a pixel
        assert 0 < zeroed.sum() <= 9
        rows, cols = zeroed.nonzero(as_tuple=True)
        assert rows.max() - rows.min() < 3 and cols.max() - cols.min() < 3
        torch.testing.assert_close(o[:, ~zeroed], x[0][:, ~zeroed])


def test_augment_affine_keeps_the_centre_and_changes_the_image():
    x = image_batch()
    out, _ = augment_only(degrees=20, scale=0.2).transform_batch(x, torch.zeros(32))
    assert not torch.allclose(out, x) and torch.isfinite(out).all()


def varied_image_batch() -> torch.Tensor:
    """32 copies of one image, each with its own mean and std."""
    std, mean = torch.linspace(0.5, 2.0, 32).view(-1, 1, 1, 1), torch.linspace(-3, 3, 32).view(-1, 1, 1, 1)
    return image_batch() * std + mean


def test_augment_brightness_shifts_each_image_by_a_constant_of_at_most_the_knob_times_its_std():
    """Brightness alone adds one constant per sample, (b - 1) x that sample's std with |b - 1| <= 0.3."""
    x = varied_image_batch()
    out, _ = augment_only(brightness=0.3).transform_batch(x, torch.zeros(32))
    assert out.shape == x.shape
    shift = (out - x).flatten(1)
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))  # the same at every pixel and channel
    b_minus_1 = shift[:, 0] / x.flatten(1).std(1, correction=0)
    assert (b_minus_1.abs() <= 0.3 + 1e-5).all() and b_minus_1.max() > 0.15 and b_minus_1.min() < -0.15
    assert b_minus_1.unique().numel() == 32


def test_augment_contrast_scales_each_image_about_its_own_mean_by_one_factor_per_sample():
    """Contrast alone keeps every sample's mean and scales its deviation from it by one c in [0.7, 1.3]."""
    x = varied_image_batch()
    out, _ = augment_only(contrast=0.3).transform_batch(x, torch.zeros(32))
    mean = x.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(out.mean((1, 2, 3), keepdim=True), mean)
    dev_in, dev_out = (x - mean).flatten(1), (out - mean).flatten(1)
    c = (dev_in * dev_out).sum(1) / (dev_in**2).sum(1)  # least-squares factor, exact if the claim holds
    torch.testing.assert_close(dev_out, c.unsqueeze(1) * dev_in)
    assert ((c >= 0.7 - 1e-5) & (c <= 1.3 + 1e-5)).all() and c.max() > 1.15 and c.min() < 0.85
    assert c.unique().numel() == 32


def test_augment_with_every_transform_off_is_the_identity_on_images():
    """brightness=0 and contrast=0, like every other knob at 0, leave images exactly as they were."""
    x = varied_image_batch()
    out, _ = augment_only().transform_batch(x, torch.zeros(32))
    assert torch.equal(out, x)


# --- in-process runs of the real pipeline (dlrun.run.build_experiment) -------------------------------------
def fit(compose_cfg, *overrides: str) -> tuple[pl.Trainer, Experiment]:
    """Compose, validate and build as `dlrun` does, then train on the CPU (run files go to a temporary directory)."""
    cfg: DictConfig = compose_cfg(*overrides, "callbacks.model_summary=false", "callbacks.progress_bar=false")
    validate(cfg)
    choices = {"model": "mlp", "dataset": "digits"}
    choices.update(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in choices)
    datamodule, _, module = build_experiment(cfg, choices)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _, _ = build_trainer(cfg, RunDir(tmp), choices)
        trainer.fit(module, datamodule=datamodule)
    return trainer, module


def test_max_norm_holds_after_real_training_steps(compose_cfg):
    _, module = fit(
        compose_cfg,
        "debug=fast",
        "optim=sgd",
        "optim.lr=5.0",
        "regularizer=[max_norm]",
        "regularizer.max_norm.c=0.5",
    )
    for w in R.penalized_weights(module.network):
        assert w.norm(dim=1).max() <= 0.5 + 1e-5


@pytest.mark.slow
def test_l1_gives_sparser_weights_than_no_penalty(compose_cfg):
    """The notes' claim (000 §5.1.2), read off the logged train/sparsity: same seed, same everything else."""
    common = (
        "optim=sgd",
        "optim.lr=0.1",
        "model.width=32",
        "callbacks=no_early_stopping",
        "trainer.max_epochs=10",
        "dataset.n_train=512",
        "dataset.batch_size=32",
    )
    sparsity = {}
    for option in ("none", "l1"):
        # plain SGD: each step moves a weight by lr * alpha = 5e-4 towards 0, so the zeroed ones jitter below 1e-3
        extra = ("regularizer.l1.alpha=0.005",) if option == "l1" else ()
        trainer, module = fit(compose_cfg, *common, f"regularizer={option}", *extra)
        sparsity[option] = float(trainer.callback_metrics["train/sparsity"])
        weights = torch.cat([w.flatten() for w in R.penalized_weights(module.network)])
        assert sparsity[option] == pytest.approx((weights.abs() < NEAR_ZERO).float().mean().item())
    assert sparsity["l1"] > 5 * sparsity["none"] and sparsity["l1"] > 0.1, sparsity


SMOKE = [f"optim={o}" for o, *_ in group_options()["optim"]]
SMOKE += [f"scheduler={o}" for o, *_ in group_options()["scheduler"]]
SMOKE += [f"regularizer=[{o}]" for o, *_ in group_options()["regularizer"] if o != "none"]
SMOKE += [
    "regularizer=[l1,dropout,max_norm,input_noise,weight_noise,label_smoothing,augment,grad_clip]",
    "regularizer=[augment,weight_noise,max_norm] model=cnn",
    "regularizer=[weight_noise,input_noise,grad_clip] model=lstm",
    "regularizer=[label_smoothing,grad_clip] scheduler=plateau optim=nesterov",
]


@pytest.mark.slow
@pytest.mark.parametrize("options", SMOKE)
def test_every_option_runs_with_debug_fast(compose_cfg, options):
    trainer, _ = fit(compose_cfg, "debug=fast", *options.split())
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/grad_norm", "train/sparsity", "lr", "val/loss"):
        assert torch.isfinite(metrics[key]), (key, metrics)
