"""Loggers from the `logger` group (composable: logger=[csv,wandb]). Each gets the run directory.

`metrics.csv` (EpochCSVLogger) is the local record every run has; Weights & Biases (WandbRunLogger),
MLflow (MlflowRunLogger) and TensorBoard mirror it. W&B never prompts and runs offline without
credentials; MLflow writes a local store unless given a server. For both, a failure to start or
write costs one warning, never the training run.
"""

from __future__ import annotations

import csv
import io
import logging
import netrc
import os
import time
import warnings
from argparse import Namespace
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger, MLFlowLogger, WandbLogger
from pytorch_lightning.loggers.logger import DummyExperiment, rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from dlrun.console import console
from dlrun.errors import UserError
from dlrun.run_summary import RunSummary
from dlrun.rundir import write_atomic

log = logging.getLogger("dlrun")


class EpochCSVLogger(Logger):
    """`metrics.csv` in the run directory: one row per epoch, train and validation metrics side by side.

    Lightning logs training and validation epoch metrics in separate calls; this logger merges them
    by epoch and rewrites the file atomically after each epoch. Test metrics go to summary.json.
    """

    def __init__(self, save_dir: str | Path):
        super().__init__()
        self._path = Path(save_dir) / "metrics.csv"
        self._rows: dict[int, dict[str, float]] = self._read_existing()  # a resumed run keeps its epochs

    def _read_existing(self) -> dict[int, dict[str, float]]:
        """The rows already in metrics.csv (a resumed run's earlier epochs; a re-run epoch overwrites its row)."""
        if not self._path.is_file():
            return {}
        with self._path.open(newline="") as handle:
            return {
                int(row["epoch"]): {k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(handle)
            }

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args, **kwargs) -> None:
        pass  # the resolved config is in config.yaml beside this file

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "epoch" not in metrics:
            return
        row = {k: v for k, v in metrics.items() if not k.startswith("test/")}
        if len(row) > 1:
            self._rows.setdefault(int(metrics["epoch"]), {}).update(row)
            self.save()

    @rank_zero_only
    def save(self) -> None:
        if not self._rows:
            return
        columns = ["epoch"] + sorted({k for row in self._rows.values() for k in row} - {"epoch"})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        for epoch in sorted(self._rows):
            writer.writerow({**self._rows[epoch], "epoch": epoch})
        write_atomic(self._path, out.getvalue())


class QuietOnFailure:
    """A tracking service's logger that never takes training down: any error of the service is caught,
    warned about once, and the logger goes quiet (the other loggers go on)."""

    service = "the tracker"
    _broken = False

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call fn; on any error, warn once and stop talking to the service."""
        if self._broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            self._fail(what, err)
            return None

    def _fail(self, what: str, err: Exception) -> None:
        if not self._broken:
            _warn(f"{self.service} failed ({what}: {type(err).__name__}: {err}); "
                  f"training goes on without {self.service}.")
        self._broken = True


# A run's status in summary.json -> the exit code W&B records: only a crash or an interrupt is a failed run;
# a diverged run finished, and its status says how.
_EXIT_CODES = {"completed": 0, "diverged": 0}


class WandbRunLogger(QuietOnFailure, WandbLogger):
    """Lightning's WandbLogger (rank 0 only, checkpoint artifacts), made safe to leave on.

    - Mode: `mode` if set, else $WANDB_MODE, else online with credentials (`wandb login` or
      $WANDB_API_KEY) and offline without: wandb.init never prompts. Runs go to `<run dir>/wandb/`.
    - One history row per epoch, keyed like metrics.csv (W&B's step is the epoch), so the two
      agree row for row; test metrics go to the summary, as in summary.json.
    - The config is the run directory's config.yaml (resolved, plain values); in a sweep the group
      is the sweep directory's name and each run is named by its job's overrides.
    - Any error of W&B's is caught: one warning, then this logger goes quiet and training goes on.
    """

    service = "W&B"

    def __init__(
        self,
        save_dir: str | Path,
        mode: str | None = None,
        project: str = "dlrun",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: Sequence[str] | str | None = None,
        job_type: str | None = None,
        log_model: bool = False,
    ):
        auto_group, auto_name = _job_identity()
        super().__init__(
            name=name or auto_name,
            save_dir=str(save_dir),
            project=project,
            log_model=log_model,
            entity=entity,
            group=group or auto_group,
            tags=_as_tags(tags),
            job_type=job_type,
            config=_read_config(Path(save_dir)),
        )
        self._mode = mode

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The wandb Run, started on first use; a do-nothing stand-in once W&B has failed."""
        if self._experiment is None and not self._broken:
            self._guard("start", self._start)
        return DummyExperiment() if self._broken or self._experiment is None else self._experiment

    def _start(self) -> None:
        import wandb

        if wandb.run is not None:  # left over by a job that died before finishing it: never log into it
            wandb.run.finish(exit_code=1)
        mode = resolve_mode(self._mode)
        # Lightning passes anonymous=None, which this wandb warns about; dlrun never runs anonymously
        kwargs = {k: v for k, v in self._wandb_init.items() if k != "anonymous"}
        settings = wandb.Settings(silent=True)  # dlrun prints the one line that matters, below
        try:
            run = wandb.init(**kwargs, mode=mode, settings=settings)
        except Exception as err:
            if mode != "online":
                raise
            _warn(f"W&B could not start online ({type(err).__name__}: {err}); logging offline instead.")
            run = wandb.init(**kwargs, mode="offline", settings=settings)
        self._experiment = run
        run.summary["run_dir"] = self.save_dir
        if run.offline:
            where = Path(run.dir).parent
            console.print(f"[bold]W&B[/bold] offline run · to upload: wandb sync {where}", soft_wrap=True)
        else:
            console.print(f"[bold]W&B[/bold] {run.url}", soft_wrap=True)
        log.info("W&B run %s (%s) in %s", run.id, "offline" if run.offline else run.url, run.dir)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        self._guard("config", super().log_hyperparams, params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._guard("logging", self._log_epoch, metrics)

    def _log_epoch(self, metrics: Mapping[str, float]) -> None:
        run = self.experiment
        if self._broken:  # W&B could not start: the warning has been given
            return
        test = {k: v for k, v in metrics.items() if k.startswith("test/")}
        if test:
            run.summary.update(test)
        row = {k: v for k, v in metrics.items() if k not in test and k != "epoch"}
        if row and "epoch" in metrics:
            # step=epoch: W&B merges the epoch's train and validation calls into one row
            run.log({**row, "epoch": int(metrics["epoch"])}, step=int(metrics["epoch"]))
        elif row:
            run.log(row)

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        self._guard("checkpoint upload", super().after_save_checkpoint, checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._guard("checkpoint upload", super().finalize, status)

    @rank_zero_only
    def finish(self, summary: RunSummary) -> None:
        """Write the run's summary (summary.json's scalars and final metrics) and finish the W&B run.

        A status other than completed or diverged finishes it with exit code 1, so that a
        crashed sweep job shows as failed; finishing also keeps it from leaking into the next job.
        """
        run, self._experiment = self._experiment, None
        if run is None:
            return
        values = {k: v for k, v in summary.to_json().items() if isinstance(v, (str, int, float, bool))}
        values.update(summary.metrics)
        self._guard("summary", run.summary.update, values)
        try:  # also after a failed write: an unfinished run would linger until the process exits
            run.finish(exit_code=_EXIT_CODES.get(summary.status, 1))
        except Exception as err:
            self._fail("finish", err)


def resolve_mode(requested: str | None) -> str:
    """online, offline or disabled: the config's mode, else $WANDB_MODE, else online only with credentials.

    Online without credentials would make wandb.init prompt (or fail without a terminal): it becomes
    offline with a warning instead.
    """
    mode = requested or os.environ.get("WANDB_MODE") or ""
    mode = {"dryrun": "offline", "run": "online", "shared": "online"}.get(mode, mode)
    if mode in ("offline", "disabled"):
        return mode
    if _has_credentials():
        return "online"
    if mode == "online":
        _warn(
            "W&B mode is online but no credentials were found (`wandb login` or WANDB_API_KEY); logging offline."
        )
    return "offline"


def _has_credentials() -> bool:
    """True when wandb.init would find an API key without asking: the environment, settings or ~/.netrc."""
    import wandb

    settings = wandb.setup().settings
    if settings.api_key or settings.identity_token_file:
        return True
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        return (
            path.is_file()
            and netrc.netrc(path).authenticators(urlparse(settings.base_url).hostname) is not None
        )
    except (OSError, netrc.NetrcParseError):
        return False


def _job_identity() -> tuple[str | None, str | None]:
    """(group, name) for W&B: a sweep's jobs share the sweep directory's name; a run is named by its overrides.

    A job of a sweep runs either inside the sweep's process (Hydra's basic launcher: MULTIRUN mode) or
    as a run of its own that dlrun's launcher started in `<sweep dir>/<num>_<overrides>` with its
    job number on the command line (`hydra.job.num=<num>`).
    """
    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        group: str | None = Path(str(hydra_cfg.sweep.dir)).name
    elif any(o.startswith("hydra.job.num=") for o in hydra_cfg.overrides.hydra):
        group = Path(hydra_cfg.runtime.output_dir).parent.name
    else:
        group = None
    overrides = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(("logger", "hydra"))]
    return group, ",".join(overrides) or None


def _as_tags(tags: Sequence[str] | str | None) -> list[str] | None:
    if tags is None or isinstance(tags, str):
        return [tags] if tags else None
    if isinstance(tags, Mapping) or not all(isinstance(t, (str, int, float)) for t in tags):
        raise UserError(
            f"logger.wandb.tags = {tags!r}: expected a list of strings",
            "e.g. logger.wandb.tags=[baseline,lr]",
        )
    return [str(t) for t in tags] or None


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config run.py wrote to the run directory (empty when there is none)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def _warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def wandb_logger(save_dir: str | Path, mode: str | None = None, **knobs: Any) -> WandbRunLogger | None:
    """The `logger=wandb` option: None when W&B is disabled (logger.wandb.mode or $WANDB_MODE), so nothing is written."""
    if (mode or os.environ.get("WANDB_MODE")) == "disabled":
        return None
    return WandbRunLogger(save_dir, mode=mode, **knobs)


# A run's status in summary.json -> MLflow's run status (a diverged or pruned run finished: its status says how)
_MLFLOW_STATUSES = {"completed": "FINISHED", "diverged": "FINISHED", "pruned": "FINISHED", "interrupted": "KILLED"}


class MlflowRunLogger(QuietOnFailure, MLFlowLogger):
    """Lightning's MLFlowLogger, made safe to leave on, logging what metrics.csv and summary.json hold.

    - Store: `tracking_uri` (a server, http://host:5000) if set, else $MLFLOW_TRACKING_URI, else a
      SQLite store `<store_dir>/mlflow.db` with artifacts beside it: `mlflow ui --backend-store-uri
      sqlite:///<store_dir>/mlflow.db` shows it.
    - Parameters: the run directory's config.yaml (resolved), flattened to dotted keys (optim.lr), the
      names overrides use. Metrics: one step per epoch, keyed like metrics.csv.
    - At the end: summary.json's numbers (best_value, wall_seconds, ...) and final metrics (test/...)
      as metrics, its strings (status, monitor, data, ...) as `dlrun.*` tags, the best checkpoint as an
      artifact with `log_model`, and the MLflow run's status from the dlrun run's.
    - Sweeps: every job is a run of the same experiment, tagged `sweep=<sweep directory name>`
      (filter with tags.sweep = '...'), named by its job's overrides.
    - Any error of MLflow's is caught: one warning, then this logger goes quiet and training goes on.
    """

    service = "MLflow"

    def __init__(
        self,
        save_dir: str | Path,
        store_dir: str | Path = "mlflow",
        tracking_uri: str | None = None,
        experiment_name: str = "dlrun",
        run_name: str | None = None,
        group: str | None = None,
        tags: Mapping[str, Any] | None = None,
        log_model: bool = False,
    ):
        auto_group, auto_name = _job_identity()
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        store = Path(store_dir).expanduser().resolve()
        if not tracking_uri:
            store.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
        group = group or auto_group
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name or auto_name or Path(save_dir).name,
            tracking_uri=tracking_uri,
            tags={**({"sweep": group} if group else {}), "dlrun.run_dir": str(save_dir), **dict(tags or {})},
            artifact_location=None if tracking_uri.startswith(("http:", "https:")) else (store / "artifacts").as_uri(),
            log_model=False,  # dlrun uploads the best checkpoint itself, once, in finish()
        )
        self._run_dir = Path(save_dir)
        self._upload_best = log_model
        self._params_logged = False
        self._per_epoch: set[str] = set()  # metrics with a history: the summary does not repeat their last value

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        self._guard("parameters", self._log_config)  # the run's config, not the module's hparams

    def _log_config(self) -> None:
        if not self._params_logged:
            self._params_logged = True
            MLFlowLogger.log_hyperparams(self, _flatten(_read_config(self._run_dir)))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._guard("logging", self._log_epoch, metrics)

    def _log_epoch(self, metrics: Mapping[str, float]) -> None:
        self._log_config()
        row = {k: v for k, v in metrics.items() if k != "epoch" and not k.startswith("test/")}
        if row and "epoch" in metrics:  # test metrics reach MLflow with the summary
            MLFlowLogger.log_metrics(self, row, step=int(metrics["epoch"]))
            self._per_epoch.update(row)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """MLflow's client, the run created on first use; a do-nothing stand-in once MLflow has failed."""
        client = None if self._broken else self._guard("start", MLFlowLogger.experiment.fget, self)
        return DummyExperiment() if client is None else client

    @property
    def name(self) -> str:
        return self._experiment_name  # Lightning's asks the server: a path built from it must not need one

    @property
    def version(self) -> str:
        return self._run_id or ""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        pass  # Lightning calls this after fit and again after test; finish() ends the run once

    @rank_zero_only
    def finish(self, summary: RunSummary) -> None:
        """Log the summary and the best checkpoint, then end the MLflow run with the dlrun run's status."""
        if self._broken:
            return
        self._guard("summary", self._log_summary, summary.to_json())
        status = _MLFLOW_STATUSES.get(summary.status, "FAILED")
        if self._initialized:
            self._guard("finish", self.experiment.set_terminated, self.run_id, status)

    def _log_summary(self, summary: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        self._log_config()
        step = int(summary.get("epochs") or 0)
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numbers.update({k: v for k, v in (summary.get("metrics") or {}).items() if k not in self._per_epoch})
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in numbers.items()]
        tags = [RunTag(f"dlrun.{k}", str(v)[:5000]) for k, v in summary.items() if isinstance(v, (str, bool))]
        self.experiment.log_batch(self.run_id, metrics=metrics, tags=tags)
        best = self._run_dir / "checkpoints" / "best.ckpt"
        if self._upload_best and best.is_file():
            self.experiment.log_artifact(self.run_id, str(best), "checkpoints")


def mlflow_logger(save_dir: str | Path, **knobs: Any) -> MlflowRunLogger:
    """The `logger=mlflow` option; a server that does not answer costs seconds of retries, not minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return MlflowRunLogger(save_dir, **knobs)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}: the names overrides use."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def build_loggers(logger_cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """One Lightning logger per selected option, each writing under the run directory."""
    loggers = {}
    for name, cfg in logger_cfg.items():
        if cfg is None:
            continue
        try:
            made = loggers[name] = instantiate(cfg, save_dir=str(run_dir))
        except InstantiationException as err:  # not callable, or its knobs refused
            raise UserError(f"logger.{name}: {cfg.get('_target_')} cannot be built: {err}",
                            "Name a logger class (or a function returning one) as module.Class.",
                            title="Unknown class") from err
        if made is not None and not isinstance(made, Logger):
            raise UserError(f"logger.{name}._target_ = {logger_cfg[name].get('_target_')} made "
                            f"{type(made).__name__}, not a Lightning logger.",
                            "Name a logger class (or a function returning one) as module.Class.", title="Unknown class")
    return [made for made in loggers.values() if made is not None]


def finalize_loggers(loggers: Sequence[Logger], summary: RunSummary) -> None:
    """Hand summary.json's content to the loggers that keep a summary (W&B, MLflow), and finish their runs."""
    for lg in loggers:
        if isinstance(lg, (WandbRunLogger, MlflowRunLogger)):
            lg.finish(summary)
