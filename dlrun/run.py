"""The one flow: config -> data -> DataSpec -> network -> LightningModule -> Trainer -> fit -> test -> summary.

Read top to bottom, `run_experiment` is the whole of a dlrun run; each step calls into the package
that owns it. It is imported only after the config has been validated, since it loads torch.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dlrun import IMPORTED_AT, __version__
from dlrun.console import console, print_config_tree, print_run_summary
from dlrun.data.datamodule import InMemoryDataModule
from dlrun.data.spec import DataSpec
from dlrun.distributed import children_join_this_run, is_rank_zero, keep_log_to_rank_zero
from dlrun.errors import UserError
from dlrun.models.base import build_network, require_knobs
from dlrun.rundir import RunDir, RunInterrupted, load_checkpoint
from dlrun.tracking import build_loggers, finalize_loggers
from dlrun.training.callbacks import Diverged, FirstStepClock, Interruption, MonitorTracker, build_callbacks
from dlrun.training.module import Experiment
from dlrun.training.optimizers import optimizer_factory
from dlrun.training.regularizers import Regularizer
from dlrun.training.schedulers import schedule_from_config
from dlrun.training.tasks import make_task

log = logging.getLogger("dlrun")

# lightning_fabric sets PYTORCH_NVML_BASED_CUDA_CHECK=1 when imported, so that asking whether CUDA exists does not
# initialize it before a fork. With it set, torch.cuda.is_available() asks NVML afresh at every call, library load
# included, and torch's Adam calls it at every step (Optimizer._accelerator_graph_capture_health_check): ~0.5 ms a
# step on a CPU machine, a quarter of a small network's step. dlrun forks no CUDA user (in-memory batches without
# DataLoader workers; DDP ranks are fresh processes), so it takes torch's own cached check.
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)

# trainer.steps_per_execution=auto on one device: Lightning's per-step overhead (~1-3 ms on a CPU core)
# paid once per 16 steps is a few percent of even the smallest network's step (see benchmarks/).
AUTO_STEPS_PER_EXECUTION = 16

# Lightning's advice that does not apply to in-memory batches and epoch-level logging.
for _pattern in (
    r".*smaller than the logging interval.*",
    r".*does not have many workers.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*when logging on epoch level in distributed setting.*",  # Experiment reduces its sums itself
    r".*The `srun` command is available on your system but is not used.*",  # a local run on a SLURM login node
    # counts steps against groups of batches; dlrun's checkpoints are taken at epoch starts anyway
    r".*resuming from a checkpoint that ended before the epoch ended.*",
):
    warnings.filterwarnings("ignore", _pattern)


def run_experiment(cfg: DictConfig) -> float | None:
    """Train and test one configuration; write the run directory; return the best monitored value.

    With `resume` set (the CLI has put the run's own config in `cfg` and its directory in
    hydra.run.dir), training continues from the directory's last checkpoint. A diverged run returns
    the worst value (inf for mode=min, -inf for max) so that a sweeper ranks it last.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = RunDir(hydra_cfg.runtime.output_dir)
    resuming = bool(cfg.get("resume"))
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("resume=")]
    choices = dict(hydra_cfg.runtime.choices)
    started = time.time()
    summary: dict[str, Any] = {
        "status": "running",
        "monitor": cfg.callbacks.monitor,
        "mode": cfg.callbacks.mode,
        "seed": cfg.seed,
        "overrides": overrides,
        "choices": {k: v for k, v in choices.items() if not k.startswith("hydra")},
        "dlrun_version": __version__,
        "run_dir": str(run_dir.path),
        "started_at": _now(),
    }
    previous = run_dir.read_summary_if_any() if resuming else None
    if previous:  # one summary for the whole run, however many sessions it took
        summary["started_at"] = previous.get("started_at", summary["started_at"])
        started -= previous.get("wall_seconds", 0.0)
    keep_log_to_rank_zero()
    if is_rank_zero() and not resuming:  # DDP ranks > 0 share this directory and write nothing to it
        run_dir.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        run_dir.write_text("overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))

    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule, spec, module = build_experiment(cfg, choices)
    summary["params"] = sum(p.numel() for p in module.network.parameters())
    summary["data"] = spec.describe()
    resume_from = _resume_checkpoint(run_dir, module) if resuming else None
    if resume_from:
        summary["resumed"] = [*(previous or {}).get("resumed", []), {"at": _now(), "epoch": resume_from[1]}]

    trainer, tracker, interruption = build_trainer(cfg, run_dir, choices, datamodule)
    # dataset.batch_size is per device; one optimizer step sees this many samples
    summary["global_batch_size"] = cfg.dataset.batch_size * trainer.world_size * trainer.accumulate_grad_batches
    if trainer.is_global_zero:
        if cfg.print_config:
            print_config_tree(cfg, choices)
        console.print(f"[bold]data[/bold] {spec.describe()} · run directory {run_dir.path}")

    try:
        with interruption.catching(), children_join_this_run(trainer, hydra_cfg):  # DDP: ranks > 0 run this job
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from and resume_from[0], weights_only=True)
            # read before testing: loading the best checkpoint restores the tracker's state as saved then
            summary.update(best_value=tracker.best_value, best_epoch=tracker.best_epoch, epochs=trainer.current_epoch)
            best_ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            fitted = {k: float(v) for k, v in trainer.callback_metrics.items()}
            tested = trainer.test(module, datamodule=datamodule, ckpt_path=best_ckpt or None, verbose=False,
                                  weights_only=True)
            if interruption.signum is not None:  # arrived while testing: the run is complete but unrecorded
                raise RunInterrupted(interruption.signum)
        summary["status"] = "completed"
    except Diverged as err:
        # a result: the summary says where; the sweeper gets the worst value and goes on
        summary.update(status="diverged", diverged=err.as_dict())
        _stopped(summary, tracker, trainer, started, run_dir)
        if trainer.is_global_zero:
            print_run_summary(summary)
            console.print(f"[bold red]diverged[/bold red] at step {err.step} (epoch {err.epoch}): {err.reason}")
        return math.inf if cfg.callbacks.mode == "min" else -math.inf
    except BaseException as err:
        # Lightning turns Ctrl-C into SystemExit(1) and SIGTERM into SIGTERMException: all are interruptions
        if interruption.signum is not None or isinstance(err, (RunInterrupted, SIGTERMException, KeyboardInterrupt)):
            summary["status"] = "interrupted"
            _stopped(summary, tracker, trainer, started, run_dir)
            signum = interruption.signum or getattr(err, "signum", None) or 15
            raise RunInterrupted(signum, run_dir.path) from None
        summary.update(status="failed", error=f"{type(err).__name__}: {err}")
        _stopped(summary, tracker, trainer, started, run_dir)
        if isinstance(err, MisconfigurationException):  # e.g. a monitor that no metric has this name
            raise UserError(str(err), "Check the callbacks and trainer settings named above.",
                            title="Invalid training setup") from err
        raise
    metrics = {**fitted, **(tested[0] if tested else {})}
    _finish(summary, trainer, started, run_dir, metrics)
    if trainer.is_global_zero:
        print_run_summary(summary)
    return summary["best_value"]


def build_trainer(
    cfg: DictConfig,
    run_dir: RunDir,
    choices: dict[str, Any],
    datamodule: InMemoryDataModule,
    extra_callbacks: Sequence[pl.Callback] = (),
) -> tuple[pl.Trainer, MonitorTracker, Interruption]:
    """Lightning's Trainer from the trainer and hardware groups, with dlrun's callbacks and loggers; the
    data module learns how to group training batches. The benchmarks build the same trainer (plus a
    timer) to measure what `dlrun` runs."""
    validating = cfg.trainer.limit_val_batches != 0
    callbacks, tracker = build_callbacks(cfg.callbacks, run_dir, validating)
    interruption = Interruption()
    callbacks += [interruption, FirstStepClock(), *extra_callbacks]
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    steps_per_execution = trainer_args.pop("steps_per_execution", "auto")  # absent from older runs' configs
    train_limit = trainer_args.pop("limit_train_batches")  # counted in batches by the data module
    try:
        trainer = pl.Trainer(
            **trainer_args,
            limit_train_batches=train_limit if train_limit == 0 else 1.0,
            **OmegaConf.to_container(cfg.hardware, resolve=True),
            logger=build_loggers(cfg.logger, run_dir.path) or False,
            callbacks=callbacks,
            default_root_dir=str(run_dir.path),
            enable_model_summary=False,  # the callbacks group adds a rich one
            enable_progress_bar=any(isinstance(c, RichProgressBar) for c in callbacks),
        )
    except MisconfigurationException as err:  # hardware=gpu without a GPU, 16-mixed on a CPU, ...
        raise UserError(
            f"hardware={choices.get('hardware')} cannot run on this machine: {err}",
            "hardware=cpu runs anywhere; hardware=auto takes the best device this machine has.",
            title="Hardware not available",
        ) from err
    datamodule.group_training_batches(_steps_per_execution(steps_per_execution, trainer.world_size), train_limit)
    return trainer, tracker, interruption


def _steps_per_execution(setting: int | str, world_size: int) -> int:
    """Training batches per Lightning step. One under DDP: the gradient all-reduce is armed by the
    wrapped module's forward, once per training_step call, so a second step in the call would not sync."""
    if setting == "auto":
        return AUTO_STEPS_PER_EXECUTION if world_size == 1 else 1
    if setting > 1 and world_size > 1:
        raise UserError(
            f"trainer.steps_per_execution = {setting}: DDP ({world_size} processes) needs 1 step per execution",
            "Leave it at auto (1 under DDP, more on one device).",
        )
    return setting


def build_experiment(
    cfg: DictConfig, choices: dict[str, Any], train: bool = True
) -> tuple[InMemoryDataModule, DataSpec, Experiment]:
    """data -> spec -> network -> LightningModule: the spec decides how the network is shaped, or that it
    cannot be built. dlrun-eval rebuilds a trained run with this same function, so its weights fit, and
    with `train=False`, which leaves the optimizer and schedule out: evaluating needs neither."""
    datamodule: InMemoryDataModule = instantiate(cfg.dataset, seed=cfg.seed, name=choices.get("dataset"))
    spec = datamodule.prepare()
    regularizers: list[Regularizer] = [instantiate(r) for r in cfg.regularizer.values() if r is not None]
    model_overrides: dict[str, Any] = {}
    task_overrides: dict[str, Any] = {}  # the loss's knobs, e.g. label_smoothing
    for reg in regularizers:
        if reg.model_knobs:
            require_knobs(cfg.model, choices.get("model", "?"), reg.model_knobs, reg.name)
        model_overrides.update(reg.model_overrides())
        task_overrides.update(reg.task_overrides())
    network = build_network(cfg.model, spec, choices.get("model", "?"), model_overrides)
    optimizer = optimizer_factory(cfg.optim) if train else None  # the class and its knobs; the parameters come later
    schedule = schedule_from_config(cfg.scheduler) if train else None
    module = Experiment(network, make_task(spec, **task_overrides), optimizer, schedule, regularizers, cfg.callbacks.monitor)
    monitor = cfg.callbacks.monitor
    if monitor not in module.logged_metric_names():
        raise UserError(
            f"callbacks.monitor = {monitor!r} is not a metric of dataset={spec.name} ({spec.task}); "
            f"it logs {', '.join(sorted(module.logged_metric_names()))}.",
            "e.g. callbacks.monitor=val/acc callbacks.mode=max",
        )
    return datamodule, spec, module


def _resume_checkpoint(run_dir: RunDir, module: Experiment) -> tuple[str, int] | None:
    """(path, epoch) of the run's last checkpoint, checked against the model; None: start from scratch."""
    path = run_dir.checkpoint("last")
    if not path.exists():
        if is_rank_zero():
            console.print("[yellow]no last checkpoint[/yellow] (callbacks.checkpoint.save_last=false, or the run "
                          "stopped before its first epoch): starting over")
        return None
    checkpoint = load_checkpoint(path, module.state_dict())
    if is_rank_zero():
        console.print(f"resuming from {path} (epoch {checkpoint.get('epoch', 0)})")
    return str(path), int(checkpoint.get("epoch", 0))


def _stopped(summary, tracker, trainer, started, run_dir: RunDir) -> None:
    """Write summary.json for a run that did not complete, with what it had reached."""
    summary.setdefault("best_value", tracker.best_value)
    summary.setdefault("best_epoch", tracker.best_epoch)
    summary.setdefault("epochs", trainer.current_epoch)
    fitted = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("test/")}
    _finish(summary, trainer, started, run_dir, fitted)


def _finish(summary, trainer, started, run_dir: RunDir, metrics: dict[str, float]) -> None:
    """Complete and write summary.json (rank 0 only)."""
    clock = next((c for c in trainer.callbacks if isinstance(c, FirstStepClock)), None)
    if clock is not None and clock.first_step_at is not None:  # imports, data and model building
        summary["startup_seconds"] = round(clock.first_step_at - IMPORTED_AT, 3)
    summary.update(
        global_step=trainer.global_step,
        metrics={k: metrics[k] for k in sorted(metrics)},
        wall_seconds=round(time.time() - started, 3),
        finished_at=_now(),
        checkpoints={
            which: str(run_dir.checkpoint(which)) for which in ("best", "last") if run_dir.checkpoint(which).exists()
        },
        world_size=trainer.world_size,
        device=str(trainer.strategy.root_device),
        torch_version=torch.__version__,
    )
    if trainer.is_global_zero:
        run_dir.write_summary(summary)
        finalize_loggers(trainer.loggers, summary)  # W&B: the summary, then finish (exit code by status)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
