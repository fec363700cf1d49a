"""The one flow: config -> data -> DataSpec -> network -> LightningModule -> Trainer -> fit -> test -> summary.

Read top to bottom, `run_experiment` is the whole of a dlrun run; each step calls into the package
that owns it. It is imported only after the config has been validated, since it loads torch.
"""

from __future__ import annotations

import dataclasses
import json
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
from hydra.utils import get_object, instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

import dlrun
from dlrun import __version__
from dlrun.console import console, print_config_tree, print_run_summary
from dlrun.curves import write_curves
from dlrun.data.datamodule import InMemoryDataModule
from dlrun.data.spec import INPUT_TASKS, DataSpec
from dlrun.distributed import children_join_this_run, is_rank_zero, keep_log_to_rank_zero
from dlrun.errors import UserError
from dlrun.metrics import monitor_example, summary_metrics
from dlrun.models.base import build_network, model_task, require_knobs
from dlrun.pictures import pictures_for
from dlrun.run_summary import RunSummary
from dlrun.rundir import RunDir, RunInterrupted, load_checkpoint
from dlrun.sample_quality import sample_quality
from dlrun.tracking import build_loggers, finalize_loggers
from dlrun.training.callbacks import Diverged, FirstStepClock, Interruption, MonitorTracker, build_callbacks
from dlrun.training.generative import experiment_class
from dlrun.training.grouping import GroupedExecution
from dlrun.training.module import Experiment
from dlrun.training.optimizers import optimizer_factory
from dlrun.training.regularizers import Regularizer
from dlrun.training.schedulers import schedule_from_config
from dlrun.training.tasks import make_task

log = logging.getLogger("dlrun")

# lightning_fabric sets PYTORCH_NVML_BASED_CUDA_CHECK=1 when imported, so that asking whether CUDA exists does not
# initialize it before a fork. With it set, torch.cuda.is_available() asks NVML afresh at every call, library load
# included, and torch's Adam calls it at every step (Optimizer._accelerator_graph_capture_health_check): ~0.5 ms a
# step on a CPU machine, a quarter of a small network's step. dlrun forks no CUDA user (DDP ranks are fresh processes;
# the DataLoader workers of streamed data only index host arrays), so it takes torch's own cached check.
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)

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
    summary = RunSummary(
        status="running",
        monitor=cfg.callbacks.monitor,
        mode=cfg.callbacks.mode,
        seed=cfg.seed,
        overrides=overrides,
        choices={k: v for k, v in choices.items() if not k.startswith("hydra")},
        dlrun_version=__version__,
        run_dir=str(run_dir.path),
        started_at=_now(),
    )
    previous = run_dir.read_summary_if_any() if resuming else None
    if previous:  # one summary for the whole run, however many sessions it took
        summary.started_at = previous.started_at or summary.started_at
        started -= previous.wall_seconds or 0.0
    keep_log_to_rank_zero()
    if is_rank_zero() and not resuming:  # DDP ranks > 0 share this directory and write nothing to it
        run_dir.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        run_dir.write_text("overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))

    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule, spec, module = build_experiment(cfg, choices)
    summary.params = sum(p.numel() for p in module.network.parameters())
    summary.data = spec.describe()
    summary.data_notes = datamodule.notes or None
    summary.data_path = datamodule.data_path
    if datamodule.preprocessing is not None and is_rank_zero() and not resuming:
        run_dir.write_text(run_dir.preprocessing_file.name, json.dumps(datamodule.preprocessing, indent=2) + "\n")
    resume_from = _resume_checkpoint(run_dir, module) if resuming else None
    if resume_from:
        summary.resumed = [*((previous and previous.resumed) or []), {"at": _now(), "epoch": resume_from[1]}]

    pictures = pictures_for(module.network, spec, run_dir.path, cfg.seed)  # samples.png, ...: models that draw
    trainer, tracker, interruption = build_trainer(cfg, run_dir, choices, pictures,
                                                   validation_stages=module.validation_stages)
    if tracker.monitor is None:  # a val/* monitor and no validation: nothing to select the best epoch by
        summary.monitor = None
        if trainer.is_global_zero:
            console.print(f"[yellow]no validation[/yellow] (dataset.val_fraction=0): no {cfg.callbacks.monitor} to "
                          "stop early or pick the best epoch by; best.ckpt is the last epoch, and the test split measures it")
    # dataset.batch_size is per device; one optimizer step sees this many samples
    accumulated = cfg.trainer.get("accumulate_grad_batches", 1)  # absent from older runs' configs
    summary.global_batch_size = cfg.dataset.batch_size * trainer.world_size * accumulated
    if trainer.is_global_zero:
        if cfg.print_config:
            print_config_tree(cfg, choices)
        path = datamodule.data_path
        console.print(f"[bold]data[/bold] {spec.describe()} · {path['mode']} ({path['reason']}) · run directory {run_dir.path}")
        if datamodule.notes:
            console.print("[bold]data notes[/bold] " + ", ".join(f"{k} {v}" for k, v in datamodule.notes.items()))

    try:
        with interruption.catching(), children_join_this_run(trainer, hydra_cfg):  # DDP: ranks > 0 run this job
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from and resume_from[0], weights_only=True)
            # read before testing: loading the best checkpoint restores the tracker's state as saved then
            _record_training(summary, tracker, trainer)
            best_ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            fitted = tracker.state_dict()  # the best and the last epoch's metrics
            tested = trainer.test(module, datamodule=datamodule, ckpt_path=best_ckpt or None, verbose=False,
                                  weights_only=True)
            if interruption.signum is not None:  # arrived while testing: the run is complete but unrecorded
                raise RunInterrupted(interruption.signum)
        summary.status = "completed"
        if trainer.is_global_zero:  # the tested model's samples (generative models on data with classes)
            summary.sample_quality = sample_quality(module.network, datamodule, spec, cfg.dataset, cfg.paths.data_dir,
                                                    cfg.seed)
    except Diverged as err:
        # a result: the summary says where; the sweeper gets the worst value and goes on
        summary.status, summary.diverged = "diverged", err.as_dict()
        _stopped(summary, tracker, trainer, started, run_dir)
        if trainer.is_global_zero:
            print_run_summary(summary)
            console.print(f"[bold red]diverged[/bold red] at step {err.step} (epoch {err.epoch}): {err.reason}")
        return math.inf if cfg.callbacks.mode == "min" else -math.inf
    except BaseException as err:
        # Lightning turns Ctrl-C into SystemExit(1) and SIGTERM into SIGTERMException: all are interruptions
        if interruption.signum is not None or isinstance(err, (RunInterrupted, SIGTERMException, KeyboardInterrupt)):
            summary.status = "interrupted"
            _stopped(summary, tracker, trainer, started, run_dir)
            signum = interruption.signum or getattr(err, "signum", None) or 15
            raise RunInterrupted(signum, run_dir.path) from None
        summary.status, summary.error = "failed", f"{type(err).__name__}: {err}"
        _stopped(summary, tracker, trainer, started, run_dir)
        if isinstance(err, MisconfigurationException):  # e.g. a monitor that no metric has this name
            raise UserError(str(err), "Check the callbacks and trainer settings named above.",
                            title="Invalid training setup") from err
        raise
    _finish(summary, trainer, started, run_dir, summary_metrics(fitted, tested[0] if tested else {}))
    if trainer.is_global_zero:
        print_run_summary(summary)
    return summary.best_value


def build_trainer(
    cfg: DictConfig,
    run_dir: RunDir,
    choices: dict[str, Any],
    extra_callbacks: Sequence[pl.Callback] = (),
    validation_stages: Sequence[str] = ("val",),
) -> tuple[pl.Trainer, MonitorTracker, Interruption]:
    """Lightning's Trainer from the trainer and hardware groups, with dlrun's callbacks and loggers, and
    grouped execution (steps_per_execution, accumulate_grad_batches: see training/grouping.py). The
    benchmarks build the same trainer (plus a timer) to measure what `dlrun` runs. `validation_stages` are
    the experiment's (Experiment.validation_stages): what its validation loop logs, if it runs at all."""
    stages = tuple(validation_stages) if cfg.trainer.limit_val_batches != 0 else ()
    callbacks, tracker = build_callbacks(cfg.callbacks, run_dir, stages)
    interruption = Interruption()
    callbacks += [interruption, FirstStepClock(), *extra_callbacks]
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args.pop("train_eval", None)  # dlrun's: the data module's extra validation loader (build_experiment)
    if not stages:  # no split to validate on (dataset.val_fraction=0): Lightning never asks for a loader
        trainer_args.update(limit_val_batches=0, num_sanity_val_steps=0)
    grouping = GroupedExecution.from_trainer_args(trainer_args)  # dlrun's keys, not Lightning's
    callbacks.append(grouping)
    if trainer_args.get("profiler"):  # debug=profile: Lightning's profiler, built from its _target_
        trainer_args["profiler"] = instantiate(cfg.trainer.profiler)
    try:
        trainer = pl.Trainer(
            **trainer_args,
            **OmegaConf.to_container(cfg.hardware, resolve=True),
            logger=build_loggers(cfg.logger, run_dir.path) or False,
            callbacks=callbacks,
            default_root_dir=str(run_dir.path),
            enable_model_summary=False,  # the callbacks group adds a rich one
            enable_progress_bar=any(isinstance(c, RichProgressBar) for c in callbacks),
            use_distributed_sampler=False,  # dlrun's batches stride DDP ranks themselves (BatchOrder), streamed too
        )
    except MisconfigurationException as err:  # hardware=gpu without a GPU, 16-mixed on a CPU, ...
        raise UserError(
            f"hardware={choices.get('hardware')} cannot run on this machine: {err}",
            "hardware=cpu runs anywhere; hardware=auto takes the best device this machine has.",
            title="Hardware not available",
        ) from err
    grouping.resolve(trainer.world_size)
    return trainer, tracker, interruption


def build_experiment(
    cfg: DictConfig, choices: dict[str, Any], preprocessing: dict | None = None, train: bool = True
) -> tuple[InMemoryDataModule, DataSpec, Experiment]:
    """data -> spec -> network -> LightningModule: the spec decides how the network is shaped, or that it
    cannot be built. dlrun-eval rebuilds a trained run with this same function, so its weights fit: it passes
    the run's saved `preprocessing`, so that the data is transformed as in training, and `train=False`, which
    leaves the optimizer and schedule out (evaluating needs neither)."""
    check_targets(cfg)
    datamodule: InMemoryDataModule = instantiate(cfg.dataset, seed=cfg.seed, name=choices.get("dataset"))
    datamodule.device = _training_device(cfg.hardware.get("accelerator", "cpu"))  # whose free memory is the budget
    datamodule.evaluate_train = bool(cfg.trainer.get("train_eval", False))  # absent from older runs' configs
    if preprocessing is not None:
        datamodule.use_preprocessing(preprocessing)
    task = model_task(cfg.model)  # an autoencoder, a VAE: the inputs alone, scaled to [0, 1]; labels ignored
    datamodule.unit_inputs = task in INPUT_TASKS
    spec = datamodule.prepare()
    if task is not None:
        spec = dataclasses.replace(spec, task=task)
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
    task = make_task(spec, **task_overrides, network=network)  # a GAN's, an RBM's: the network's own
    module = experiment_class(task)(network, task, optimizer, schedule, regularizers, cfg.callbacks.monitor,
                                    datamodule.validation_splits())
    # val/* is accepted without a validation split too: such a run trains unmonitored (build_trainer)
    monitor, logged = cfg.callbacks.monitor, module.metrics.monitorable(("train", "val", *module.validation_stages))
    if monitor not in logged:
        raise UserError(
            f"callbacks.monitor = {monitor!r} is not a metric of dataset={spec.name} ({spec.task}) "
            f"with model={choices.get('model', '?')}; it logs {', '.join(sorted(logged))}.",
            f"e.g. {monitor_example(module.task.kind)}",
        )
    return datamodule, spec, module


def check_targets(cfg: DictConfig) -> None:
    """Refuse a component whose `_target_` is not a class of its kind (optim._target_=builtins.dict), by
    name, before anything is built from it."""
    bases = {"dataset": pl.LightningDataModule, "model": torch.nn.Module, "optim": torch.optim.Optimizer,
             "scheduler": (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)}
    entries = [(group, OmegaConf.select(cfg, f"{group}._target_"), base) for group, base in bases.items()]
    entries += [(f"regularizer.{name}", node.get("_target_"), Regularizer)
                for name, node in (cfg.get("regularizer") or {}).items() if isinstance(node, DictConfig)]
    for key, target, base in entries:
        if target is None:
            continue
        try:
            found = get_object(str(target))
        except Exception as err:  # no such module or attribute: Hydra's import error
            found = err
        if not (isinstance(found, type) and issubclass(found, base)):
            kinds = " or ".join(b.__name__ for b in (base if isinstance(base, tuple) else (base,)))
            raise UserError(f"{key}._target_ = {target}: expected a class derived from {kinds}"
                            + (f" ({found})" if isinstance(found, Exception) else ""),
                            "Name a class as module.Class, with its module on PYTHONPATH.", title="Unknown class")


def _training_device(accelerator: str) -> torch.device:
    """The device the accelerator setting trains on, as far as the data's memory budget cares: a GPU or the host."""
    wants_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda") if wants_gpu and torch.cuda.is_available() else torch.device("cpu")


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


def _record_training(summary: RunSummary, tracker: MonitorTracker, trainer: pl.Trainer) -> None:
    summary.best_value, summary.best_epoch = tracker.best_value, tracker.best_epoch
    summary.epochs = trainer.current_epoch


def _stopped(summary: RunSummary, tracker, trainer, started, run_dir: RunDir) -> None:
    """Write summary.json for a run that did not complete, with what it had reached."""
    if summary.epochs is None:  # stopped before fit ended
        _record_training(summary, tracker, trainer)
    _finish(summary, trainer, started, run_dir, summary_metrics(tracker.state_dict(), {}))


def _finish(summary: RunSummary, trainer, started, run_dir: RunDir, reported: dict[str, Any]) -> None:
    """Complete and write summary.json (rank 0 only); `reported` is summary_metrics': metrics, last_epoch."""
    clock = next((c for c in trainer.callbacks if isinstance(c, FirstStepClock)), None)
    if clock is not None and clock.first_step_at is not None:  # imports, data and model building
        summary.startup_seconds = round(clock.first_step_at - dlrun.IMPORTED_AT, 3)  # a forked job resets it
    summary.global_step = trainer.global_step
    summary.metrics, summary.last_epoch = reported["metrics"], reported["last_epoch"]
    summary.wall_seconds = round(time.time() - started, 3)
    summary.finished_at = _now()
    summary.checkpoints = {
        which: str(run_dir.checkpoint(which)) for which in ("best", "last") if run_dir.checkpoint(which).exists()
    }
    summary.world_size = trainer.world_size
    summary.device = str(trainer.strategy.root_device)
    summary.torch_version = torch.__version__
    if trainer.is_global_zero:
        run_dir.write_summary(summary)
        write_curves(run_dir.path, summary.to_json())  # curves.png, from metrics.csv and the summary
        finalize_loggers(trainer.loggers, summary)  # W&B: the summary, then finish (exit code by status)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
