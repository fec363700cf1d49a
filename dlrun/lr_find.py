"""`dlrun-lr-find [OVERRIDE...]`: the learning-rate range test (Smith 2017) on any dlrun configuration.

    dlrun-lr-find                                   # the default experiment (MLP on digits, Adam)
    dlrun-lr-find model=cnn optim=sgd --steps 300 --max-lr 10

Training starts at `--min-lr` and multiplies the rate by the same factor after every step, up to
`--max-lr` over `--steps` steps (L. N. Smith, "Cyclical Learning Rates for Training Neural Networks",
WACV 2017, §3.3, the "LR range test"), stopping early once the loss has blown up (4x its lowest,
smoothed). The suggestion is where the smoothed loss falls fastest against log(rate), the steepest
descent, looked for before the loss's minimum: a rate at which the network learns fastest while the
loss still falls. (The other common rule, a tenth of the rate at the minimum, is recorded beside it.)

Each step is dlrun's own training step (Experiment.training_step under Lightning's Trainer: the
regularizers, penalties, precision and hardware of the config), one batch per step. Lightning's own
finder cannot drive it, as dlrun optimizes manually. The config's schedule is left out (it would move
the rate); the test has no validation, test or checkpoints.

A separate command, not an option of `dlrun`: it trains no model to keep and writes none of a run's
files, so the run's flow (run.py) stays one flow. Its directory, `<output dir>/lr_find/<date>_<time>/`,
keeps config.yaml, lr_find.csv (step, rate, loss, smoothed loss), lr_find.png and lr_find.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from dlrun import CONF_DIR
from dlrun.console import console
from dlrun.error_boundary import boundary
from dlrun.errors import UserError
from dlrun.rundir import write_atomic

SMOOTHING = 0.98  # exponential moving average of the loss, bias-corrected (as in fastai's finder)
BLOWUP = 4.0  # stop once the smoothed loss exceeds this many times its lowest value


def compose(overrides: list[str]):
    """dlrun's config with the overrides, validated; the Hydra choices (data set and model names)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from dlrun.config import validate
    from dlrun.error_boundary import as_user_error

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as err:
        raise (as_user_error(err) or err) from err
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)
    return cfg, choices


def range_test(cfg, choices: dict[str, Any], steps: int, min_lr: float, max_lr: float) -> dict[str, list[float]]:
    """Train `steps` steps with exponentially increasing rates; {'lr', 'loss'} per step taken."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from dlrun.run import build_experiment

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", r".*(srun|does not have many workers|smaller than the logging).*")
    cfg.scheduler = OmegaConf.create({"_target_": None})  # the range test sets the rate itself
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, _, module = build_experiment(cfg, choices)
    recorder = _rate_sweep_callback()(steps, min_lr, max_lr)
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.hardware, resolve=True), max_steps=steps, max_epochs=-1,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                         default_root_dir=None)
    trainer.fit(module, datamodule=datamodule)
    return {"lr": recorder.rates, "loss": recorder.losses}


def _rate_sweep_callback():
    """The callback class, defined on first use: the command checks its input before torch is imported."""
    import pytorch_lightning as pl

    class RateSweep(pl.Callback):
        """Sets each step's rate before it and records its loss (training_step's return) after it."""

        def __init__(self, steps: int, min_lr: float, max_lr: float):
            self.steps, self.min_lr, self.ratio = steps, min_lr, max_lr / min_lr
            self.rates: list[float] = []
            self.losses: list[float] = []
            self._best = math.inf
            self._average = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            rate = self.min_lr * self.ratio ** (len(self.rates) / max(self.steps - 1, 1))
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = rate
            self.rates.append(rate)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses = outputs.get("loss") if isinstance(outputs, dict) else outputs  # Lightning wraps it in a dict
            loss = float(losses[0]) if losses is not None and losses.numel() else math.nan
            self.losses.append(loss)
            self._average = SMOOTHING * self._average + (1 - SMOOTHING) * loss
            smoothed = self._average / (1 - SMOOTHING ** len(self.losses))
            self._best = min(self._best, smoothed)
            if not math.isfinite(loss) or smoothed > BLOWUP * self._best:
                trainer.should_stop = True  # the loss has blown up: higher rates say nothing more

    return RateSweep


def smooth(losses: list[float]) -> list[float]:
    """Bias-corrected exponential moving average (what the stop rule watches, and what is plotted)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, 1):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        out.append(average / (1 - SMOOTHING**i))
    return out


def suggest(rates: list[float], losses: list[float]) -> dict[str, Any]:
    """The steepest descent of the smoothed loss against log(rate), before its minimum; and min / 10."""
    smoothed = smooth(losses)
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if len(finite) < 10:
        raise UserError(f"The range test took {len(finite)} usable steps: too few to read a slope.",
                        "Raise --steps, or lower --min-lr if the loss blew up at once.", title="No suggestion")
    lowest = min(finite, key=lambda i: smoothed[i])
    skip = max(1, len(finite) // 20)  # the first steps: the average is still settling
    window = [i for i in finite if skip <= i <= lowest]
    slopes = {i: (smoothed[i + 1] - smoothed[i - 1]) / (math.log(rates[i + 1]) - math.log(rates[i - 1]))
              for i in window if 0 < i < len(rates) - 1}
    steepest = min(slopes, key=slopes.get) if slopes else lowest
    return {"suggested_lr": rates[steepest], "method": "steepest descent of the smoothed loss (Smith 2017)",
            "suggested_step": steepest, "smoothed_loss_at_suggestion": smoothed[steepest],
            "initial_smoothed_loss": smoothed[finite[0]], "min_loss_lr": rates[lowest],
            "min_loss_lr_over_10": rates[lowest] / 10}


def plot(rates: list[float], losses: list[float], result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(rates, losses, alpha=0.3, label="loss per step")
    ax.plot(rates, smooth(losses), label="smoothed")
    ax.axvline(result["suggested_lr"], color="tab:red", linestyle="--",
               label=f"suggested optim.lr={result['suggested_lr']:.2g} (steepest descent)")
    ax.axvline(result["min_loss_lr"], color="tab:gray", linestyle=":", label=f"lowest loss at {result['min_loss_lr']:.2g}")
    ax.set_xscale("log")
    finite = [v for v in smooth(losses) if math.isfinite(v)]
    lowest = min([v for v in losses if math.isfinite(v)] + finite)
    ax.set_ylim(lowest * 0.9, max(finite[0] * 1.5, lowest * 2))  # the blow-up at the end would flatten the rest
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    write_atomic(path, image.getvalue())


def lr_find(overrides: list[str], steps: int = 200, min_lr: float = 1e-6, max_lr: float = 1.0) -> dict[str, Any]:
    """Run the range test; write its directory; return lr_find.json's content."""
    from omegaconf import OmegaConf

    if not (0 < min_lr < max_lr) or steps < 10:
        raise UserError(f"--min-lr {min_lr} --max-lr {max_lr} --steps {steps}: expected 0 < min-lr < max-lr and "
                        "at least 10 steps.", "e.g. --min-lr 1e-6 --max-lr 1 --steps 200")
    cfg, choices = compose(overrides)
    out = Path(cfg.paths.output_dir) / "lr_find" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    write_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    history = range_test(cfg, choices, steps, min_lr, max_lr)
    result = suggest(history["lr"], history["loss"])
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["step", "lr", "loss", "smoothed_loss"])
    writer.writerows(zip(range(len(history["lr"])), history["lr"], history["loss"], smooth(history["loss"]),
                         strict=True))
    write_atomic(out / "lr_find.csv", table.getvalue())
    plot(history["lr"], history["loss"], result, out / "lr_find.png")
    result.update(dir=str(out.resolve()), overrides=overrides, steps_taken=len(history["lr"]), steps=steps,
                  last_lr=history["lr"][-1],
                  min_lr=min_lr, max_lr=max_lr, optim=choices.get("optim"), model=choices.get("model"))
    write_atomic(out / "lr_find.json", json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    """`dlrun-lr-find`: prints the suggested rate as an override; exit 2 with a panel on bad input."""
    parser = argparse.ArgumentParser(prog="dlrun-lr-find", description="Learning-rate range test (Smith 2017) "
                                     "with dlrun's training step; suggests optim.lr.")
    parser.add_argument("overrides", nargs="*", help="dlrun overrides, e.g. model=cnn optim=sgd")
    parser.add_argument("--steps", type=int, default=200, help="training steps (batches), default 200")
    parser.add_argument("--min-lr", type=float, default=1e-6, help="first rate, default 1e-6")
    parser.add_argument("--max-lr", type=float, default=1.0, help="last rate, default 1")
    args = parser.parse_args(argv)
    with boundary():
        result = lr_find(args.overrides, args.steps, args.min_lr, args.max_lr)
    console.print(f"range test: {result['steps_taken']} steps, rates {args.min_lr:g} to {result['last_lr']:.3g} · "
                  f"lowest loss at {result['min_loss_lr']:.3g} · {result['dir']}/lr_find.png", soft_wrap=True)
    console.print(f"[bold]suggested[/bold] (steepest descent): [bold green]optim.lr={result['suggested_lr']:.2g}[/bold green]",
                  soft_wrap=True)


if __name__ == "__main__":
    main()
