"""The one flow: config -> data -> DataSpec -> network -> LightningModule -> Trainer -> fit -> test -> summary.

Read top to bottom, `run_experiment` is the whole of a dlrun run; each step calls into the package
that owns it. It is imported only after the config has been validated, since it loads torch.
"""

from __future__ import annotations

import logging
import time
import warnings
from datetime import datetime, timezone
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dlrun import __version__
from dlrun.console import console, print_config_tree, print_run_summary
from dlrun.data.datamodule import InMemoryDataModule
from dlrun.models.base import build_network, require_knobs
from dlrun.rundir import RunDir
from dlrun.tracking import build_loggers
from dlrun.training.callbacks import build_callbacks
from dlrun.training.module import Experiment
from dlrun.training.regularizers import Regularizer
from dlrun.training.tasks import make_task

log = logging.getLogger("dlrun")

# Lightning's advice that does not apply to in-memory batches and epoch-level logging.
for _pattern in (
    r".*smaller than the logging interval.*",
    r".*does not have many workers.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
):
    warnings.filterwarnings("ignore", _pattern)


def run_experiment(cfg: DictConfig) -> float | None:
    """Train and test one configuration; write the run directory; return the best monitored value."""
    hydra_cfg = HydraConfig.get()
    run_dir = RunDir(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
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
    run_dir.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    run_dir.write_text("overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))

    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    # data -> spec -> network: the spec decides how the network is shaped, or that it cannot be built
    datamodule: InMemoryDataModule = instantiate(cfg.dataset, seed=cfg.seed, name=choices.get("dataset"))
    spec = datamodule.prepare()
    regularizers: list[Regularizer] = [instantiate(r) for r in cfg.regularizer.values() if r is not None]
    model_overrides: dict[str, Any] = {}
    for reg in regularizers:
        if reg.model_knobs:
            require_knobs(cfg.model, choices.get("model", "?"), reg.model_knobs, reg.name)
        model_overrides.update(reg.model_overrides())
    network = build_network(cfg.model, spec, choices.get("model", "?"), model_overrides)
    summary["params"] = sum(p.numel() for p in network.parameters())
    summary["data"] = spec.describe()

    module = Experiment(network, make_task(spec), cfg.optim, cfg.scheduler, regularizers, cfg.callbacks.monitor)
    validating = cfg.trainer.limit_val_batches != 0
    callbacks, tracker = build_callbacks(cfg.callbacks, run_dir, validating)
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        **OmegaConf.to_container(cfg.hardware, resolve=True),
        logger=build_loggers(cfg.logger, run_dir.path) or False,
        callbacks=callbacks,
        default_root_dir=str(run_dir.path),
        enable_model_summary=False,  # the callbacks group adds a rich one
        enable_progress_bar=any(type(c).__name__ == "RichProgressBar" for c in callbacks),
    )
    if trainer.is_global_zero:
        if cfg.print_config:
            print_config_tree(cfg, choices)
        console.print(f"[bold]data[/bold] {spec.describe()} · run directory {run_dir.path}")

    try:
        trainer.fit(module, datamodule=datamodule)
        # read before testing: loading the best checkpoint restores the tracker's state as saved then
        summary.update(best_value=tracker.best_value, best_epoch=tracker.best_epoch, epochs=trainer.current_epoch)
        best_ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        fitted = {k: float(v) for k, v in trainer.callback_metrics.items()}
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best_ckpt or None, verbose=False)
        summary["status"] = "completed"
    except Exception as err:
        summary.update(status="failed", error=f"{type(err).__name__}: {err}")
        summary.setdefault("best_value", tracker.best_value)
        summary.setdefault("best_epoch", tracker.best_epoch)
        summary.setdefault("epochs", trainer.current_epoch)
        _finish(summary, trainer, started, run_dir, {})
        raise
    metrics = {**fitted, **(tested[0] if tested else {})}
    _finish(summary, trainer, started, run_dir, metrics)
    if trainer.is_global_zero:
        print_run_summary(summary)
    return summary["best_value"]


def _finish(summary, trainer, started, run_dir: RunDir, metrics: dict[str, float]) -> None:
    """Complete and write summary.json (rank 0 only)."""
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
