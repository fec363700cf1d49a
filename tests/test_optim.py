"""Optimizers and learning-rate schedules against the lecture notes' equations, computed by hand.

Each optimizer option is built from its real YAML (defaults included) and run for a few steps on a
quadratic loss; the notes' update equation, written out below in plain Python, must give the same
trajectory after the change of variables docs/optimization.md states.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from pytorch_lightning.callbacks import EarlyStopping

from dlrun.config import find_problems
from dlrun.rundir import RunDir
from dlrun.training.callbacks import build_callbacks
from dlrun.training.optimizers import build_optimizer
from dlrun.training.schedulers import build_scheduler

# f(w) = 1/2 sum a_i w_i^2 + b . w, an ill-conditioned bowl: gradient a * w + b
A = torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)
B = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64)
W0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
STEPS = 4


def grad(w: torch.Tensor) -> torch.Tensor:
    return A * w + B


def torch_trajectory(optimizer_cfg) -> list[torch.Tensor]:
    """Parameters after each of STEPS steps of the configured optimizer, gradients by autograd."""
    w = torch.nn.Parameter(W0.clone())
    opt = build_optimizer(optimizer_cfg, [w])
    out = []
    for _ in range(STEPS):
        opt.zero_grad()
        (0.5 * (A * w * w).sum() + (B * w).sum()).backward()
        opt.step()
        out.append(w.detach().clone())
    return out


# The notes' equations, symbol for symbol; each returns the parameters after every step.
def notes_sgd(lr):
    w, out = W0.clone(), []
    for _ in range(STEPS):
        w = w - lr * grad(w)
        out.append(w)
    return out


def notes_momentum(lr, beta):  # 000 §6.3.1: v <- beta v - lr g; w <- w + v
    w, v, out = W0.clone(), torch.zeros(3, dtype=torch.float64), []
    for _ in range(STEPS):
        v = beta * v - lr * grad(w)
        w = w + v
        out.append(w)
    return out


def notes_nesterov(lr, beta):
    """004 §6.2.7 / 000 §6.3.2 with its erratum fixed (last step w <- w + v). PyTorch's parameters are the
    look-ahead point w + beta v, so the trajectory to compare is that point."""
    w, v, out = W0.clone(), torch.zeros(3, dtype=torch.float64), []
    for _ in range(STEPS):
        look_ahead = w + beta * v
        v = beta * v - lr * grad(look_ahead)
        w = w + v
        out.append(w + beta * v)
    return out


def notes_adagrad(lr, delta):  # 000 §6.5.1: G <- G + g^2; w <- w - lr g / sqrt(G + delta)
    w, G, out = W0.clone(), torch.zeros(3, dtype=torch.float64), []
    for _ in range(STEPS):
        g = grad(w)
        G = G + g * g
        w = w - lr * g / torch.sqrt(G + delta)
        out.append(w)
    return out


def notes_rmsprop(lr, beta, eps):  # 002 §8.2.3: S <- beta S + (1 - beta) g^2; w <- w - lr g / (sqrt(S) + eps)
    w, S, out = W0.clone(), torch.zeros(3, dtype=torch.float64), []
    for _ in range(STEPS):
        g = grad(w)
        S = beta * S + (1 - beta) * g * g
        w = w - lr * g / (torch.sqrt(S) + eps)
        out.append(w)
    return out


def notes_adam(lr, beta1, beta2, delta, decoupled_decay=0.0):
    """000 §6.5.3; with decoupled_decay, AdamW's extra w <- w - lr * decay * w (at the pre-step weights)."""
    w, s, r, out = W0.clone(), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), []
    for t in range(1, STEPS + 1):
        g = grad(w)
        s = beta1 * s + (1 - beta1) * g
        r = beta2 * r + (1 - beta2) * g * g
        s_hat, r_hat = s / (1 - beta1**t), r / (1 - beta2**t)
        w = w - lr * decoupled_decay * w - lr * s_hat / (torch.sqrt(r_hat) + delta)
        out.append(w)
    return out


NOTES = {
    "sgd": lambda c: notes_sgd(c.lr),
    "momentum": lambda c: notes_momentum(c.lr, c.momentum),
    "nesterov": lambda c: notes_nesterov(c.lr, c.momentum),
    "adagrad": lambda c: notes_adagrad(c.lr, c.initial_accumulator_value),
    "rmsprop": lambda c: notes_rmsprop(c.lr, c.alpha, c.eps),
    "adam": lambda c: notes_adam(c.lr, *c.betas, c.eps),
    "adamw": lambda c: notes_adam(c.lr, *c.betas, c.eps, decoupled_decay=c.weight_decay),
}


@pytest.mark.parametrize("name", sorted(NOTES))
def test_optimizer_follows_the_notes_update(compose_cfg, name):
    cfg = compose_cfg(f"optim={name}").optim
    got, expected = torch_trajectory(cfg), NOTES[name](cfg)
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=f"{name}, step {step + 1}")


def test_momentum_buffer_is_the_notes_velocity_over_minus_lr(compose_cfg):
    """PyTorch's v <- beta v + g; w <- w - lr v is the notes' form with v_notes = -lr * v_torch."""
    cfg = compose_cfg("optim=momentum").optim
    w = torch.nn.Parameter(W0.clone())
    opt = build_optimizer(cfg, [w])
    v_notes = torch.zeros(3, dtype=torch.float64)
    for _ in range(3):
        g = grad(w.detach())
        v_notes = cfg.momentum * v_notes - cfg.lr * g
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(-cfg.lr * opt.state[w]["momentum_buffer"], v_notes, rtol=1e-12, atol=1e-12)


def test_optimizer_defaults_are_the_notes(compose_cfg):
    assert compose_cfg("optim=sgd").optim.lr == 0.01
    for name in ("momentum", "nesterov"):
        assert compose_cfg(f"optim={name}").optim.momentum == 0.9
    assert compose_cfg("optim=nesterov").optim.nesterov is True
    assert compose_cfg("optim=adagrad").optim.initial_accumulator_value == 1e-8
    rms = compose_cfg("optim=rmsprop").optim
    assert (rms.alpha, rms.eps) == (0.9, 1e-8)
    for name in ("adam", "adamw"):
        adam = compose_cfg(f"optim={name}").optim
        assert (list(adam.betas), adam.eps) == ([0.9, 0.999], 1e-8)


def test_every_optimizer_knob_is_overridable_and_reaches_the_optimizer(compose_cfg):
    cfg = compose_cfg("optim=adam", "optim.lr=0.05", "optim.betas=[0.8,0.99]", "optim.eps=1e-6").optim
    group = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))]).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (0.05, (0.8, 0.99), 1e-6)
    group = build_optimizer(
        compose_cfg("optim=rmsprop", "optim.alpha=0.99", "optim.momentum=0.5").optim,
        [torch.nn.Parameter(torch.zeros(2))],
    ).param_groups[0]
    assert (group["alpha"], group["momentum"]) == (0.99, 0.5)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["optim=momentum", "optim.momentum=1.5"], "optim.momentum"),
        (["optim=adam", "optim.betas=[0.9]"], "optim.betas"),
        (["optim=rmsprop", "optim.alpha=-0.1"], "optim.alpha"),
        (["optim=adam", "optim.eps=0"], "optim.eps"),
        (["scheduler=step", "scheduler.gamma=0"], "scheduler.gamma"),
        (["scheduler=warmup", "scheduler.interval=batch"], "scheduler.interval"),
        (["scheduler=plateau", "scheduler.factor=1.0"], "scheduler.factor"),
    ],
)
def test_bad_values_name_the_key(compose_cfg, overrides, key):
    problems = find_problems(compose_cfg(*overrides))
    assert any(p.startswith(key) for p in problems), problems


def test_adagrad_may_drop_eps_because_delta_sits_in_the_accumulator(compose_cfg):
    assert find_problems(compose_cfg("optim=adagrad")) == []


# --- schedules ----------------------------------------------------------------------------------------
def lr_per_epoch(
    compose_cfg, option: str, lr: float, epochs: int, *overrides: str, metrics=None
) -> list[float]:
    """The learning rate each epoch trains with, stepping the schedule as Lightning does once per epoch."""
    cfg = compose_cfg(f"scheduler={option}", *overrides)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    config = build_scheduler(cfg.scheduler, opt, cfg.callbacks.monitor)
    assert config["interval"] == "epoch"
    lrs = []
    for epoch in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if metrics is None:
            config["scheduler"].step()
        else:
            config["scheduler"].step(metrics[epoch])
    return lrs


def test_inverse_time_reproduces_the_notes_table(compose_cfg):
    lrs = lr_per_epoch(compose_cfg, "inverse_time", 0.2, 5)
    assert lrs[0] == pytest.approx(0.2)  # epoch 0 trains at lr_0; the notes' table starts at epoch 1
    assert [round(x, 4) for x in lrs[1:]] == [0.1, 0.0667, 0.05, 0.04]


def test_step_halves_every_k_epochs(compose_cfg):
    lrs = lr_per_epoch(compose_cfg, "step", 0.8, 9, "scheduler.step_size=3")
    assert lrs == pytest.approx([0.8] * 3 + [0.4] * 3 + [0.2] * 3)


def test_exponential_is_lr0_times_gamma_to_the_t(compose_cfg):
    lrs = lr_per_epoch(compose_cfg, "exponential", 0.1, 6, "scheduler.gamma=0.5")
    assert lrs == pytest.approx([0.1 * 0.5**t for t in range(6)])


def test_linear_decays_to_end_factor_at_tau_then_stays(compose_cfg):
    lrs = lr_per_epoch(compose_cfg, "linear", 1.0, 8, "scheduler.total_iters=4", "scheduler.end_factor=0.2")
    # 003: eps_k = (1 - k/tau) eps_0 + (k/tau) eps_tau, eps_tau = 0.2 eps_0
    assert lrs == pytest.approx([1 - 0.8 * min(t, 4) / 4 for t in range(8)])


def test_cosine_follows_the_closed_form(compose_cfg):
    lrs = lr_per_epoch(compose_cfg, "cosine", 1.0, 11, "trainer.max_epochs=10", "scheduler.eta_min=0.1")
    assert lrs == pytest.approx([0.1 + 0.9 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(11)])


def test_warmup_rises_linearly_then_decays(compose_cfg):
    lrs = lr_per_epoch(compose_cfg, "warmup", 1.0, 13, "scheduler.warmup_iters=3", "trainer.max_epochs=11")
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # equal steps up to lr_0 at epoch 3
    decay = lrs[3:12]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert lrs[7] == pytest.approx(0.5)  # half-way through the cosine from epoch 3 to epoch 11
    assert lrs[11] == pytest.approx(0.0, abs=1e-12) and lrs[12] == pytest.approx(0.0, abs=1e-12)


def test_plateau_reduces_after_patience_epochs_without_improvement(compose_cfg):
    losses = [1.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    lrs = lr_per_epoch(compose_cfg, "plateau", 1.0, 8, "scheduler.patience=2", metrics=losses)
    # 0.8 first seen at epoch 2; epochs 3 and 4 are the 2 epochs of patience; epoch 5 is the third bad one
    assert lrs == pytest.approx([1.0] * 6 + [0.5] * 2)


def test_plateau_follows_the_monitored_metric_and_its_mode(compose_cfg):
    cfg = compose_cfg("scheduler=plateau", "callbacks.monitor=val/acc", "callbacks.mode=max")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    config = build_scheduler(cfg.scheduler, opt, cfg.callbacks.monitor)
    assert config["monitor"] == "val/acc" and config["scheduler"].mode == "max"


def test_step_interval_is_passed_to_lightning_not_to_the_constructor(compose_cfg):
    cfg = compose_cfg("scheduler=warmup", "scheduler.interval=step")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert build_scheduler(cfg.scheduler, opt, "val/loss")["interval"] == "step"


# --- early stopping -------------------------------------------------------------------------------------
def test_early_stopping_knobs_are_overridable(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "callbacks.monitor=val/acc",
        "callbacks.mode=max",
        "callbacks.early_stopping.patience=2",
        "callbacks.early_stopping.min_delta=0.01",
    )
    callbacks, _ = build_callbacks(cfg.callbacks, RunDir(tmp_path), validation_stages=("val",))
    (es,) = [c for c in callbacks if isinstance(c, EarlyStopping)]
    assert (es.monitor, es.mode, es.patience, abs(es.min_delta)) == ("val/acc", "max", 2, 0.01)
    assert find_problems(compose_cfg("callbacks.early_stopping.patience=-1"))
    assert find_problems(compose_cfg("callbacks.mode=median"))


# --- end to end: the logged learning rate and diagnostics -------------------------------------------------
@pytest.mark.slow
def test_logged_lr_and_diagnostics_each_epoch(run_dlrun):
    result = run_dlrun(
        "optim=sgd",
        "optim.lr=0.2",
        "scheduler=inverse_time",
        "regularizer=[l1,grad_clip]",
        "callbacks=no_early_stopping",
        "trainer.max_epochs=5",
        "dataset.n_train=128",
        "print_config=false",
    )
    rows = list(csv.DictReader((result.run_dir / "metrics.csv").open()))
    train_rows = [r for r in rows if r.get("lr")]
    assert [round(float(r["lr"]), 4) for r in train_rows] == [0.2, 0.1, 0.0667, 0.05, 0.04]
    for row in train_rows:
        assert float(row["train/penalty"]) > 0
        assert float(row["train/grad_norm"]) > 0
        assert 0 <= float(row["train/sparsity"]) <= 1
