"""dlrun's Hydra launcher (`hydra/launcher=dlrun`, the default for `dlrun -m`).

Hydra's basic launcher runs every job inside the sweep's own process: one job's crash, out-of-memory
kill, W&B run or DDP re-launch then spoils the rest. This launcher composes each job's config here
(a job whose overrides cannot be composed fails alone, before any process starts), then runs the job
as a plain `dlrun` run in a fresh process (`dlrun.sweep.launcher`), and answers the sweeper with the
job's best monitored value, which is what the Optuna sweeper optimizes.

Hydra only instantiates launchers defined under the `hydra_plugins` namespace package, hence this file;
the machinery lives in `dlrun/sweep/`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

import dlrun.sweep  # noqa: F401  (registers the ${dlrun.coalesce:...} resolver of conf/hydra/default.yaml)
from dlrun.command_line import job_command
from dlrun.config import parse_rule, validate
from dlrun.console import console, format_value
from dlrun.error_boundary import as_user_error, traceback_env
from dlrun.errors import UserError
from dlrun.run_summary import RunSummary
from dlrun.sweep.launcher import (
    JOB_LOG,
    Job,
    completed_summary,
    launched_sweeps,
    run_jobs,
    set_aside,
    visible_gpus,
)
from dlrun.sweep.pictures import RECORDED_SWEEP
from dlrun.sweep.summary import write_summary_files

_MAX_DIR_NAME = 200  # file systems allow 255 bytes per name; long override lists are cut


class JobFailed(Exception):
    """What a sweeper gets from a failed job's JobReturn: the job's number, overrides and error."""


class DlrunLauncher(Launcher):
    """Runs each job as `python -m dlrun.cli <overrides> hydra.run.dir=<job dir>`, `n_jobs` at a time."""

    _KNOBS = {
        "n_jobs": parse_rule("int >= 1"),
        "timeout": parse_rule("float > 0 | null"),
        "jobs_per_gpu": parse_rule("int >= 1"),
    }

    def __init__(self, n_jobs: int = 1, timeout: float | None = None, gpus: Any = None, jobs_per_gpu: int = 1):
        values = {"n_jobs": n_jobs, "timeout": timeout, "jobs_per_gpu": jobs_per_gpu}
        problems = [
            f"hydra.launcher.{key} = {values[key]!r}: expected {rule.describe()}"
            for key, rule in self._KNOBS.items()
            if not rule.accepts(values[key])
        ]
        if gpus is not None and not parse_rule("list of int >= 0").accepts(list(gpus) or [0]):
            problems.append(f"hydra.launcher.gpus = {gpus!r}: expected a list of GPU ids (or null: all visible)")
        if problems:
            raise UserError("\n".join(problems), "Fix the launcher setting, e.g. hydra.launcher.n_jobs=2.")
        self.n_jobs, self.timeout, self.jobs_per_gpu = n_jobs, timeout, jobs_per_gpu
        self.gpus = None if gpus is None else [str(g) for g in gpus]
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.fixed: set[str] = set()  # overrides every job shares: shown once, not on every job's line

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # The values every job shares are checked once, here: a bad fixed value fails the sweep at once
        # (exit code 2) instead of failing every job. Values that differ per job are checked per job.
        validate(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), config.hydra)
        self.config, self.hydra_context = config, hydra_context
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        self.fixed = {o.input_line for o in parsed if not o.is_sweep_override()}
        if "optuna" in sys.modules:  # the Optuna sweeper's study: dlrun reports the jobs itself
            optuna = sys.modules["optuna"]
            optuna.logging.set_verbosity(optuna.logging.WARNING)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        resume = OmegaConf.select(self.config, "sweep.resume")
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        if resume and not sweep_dir.is_dir():
            raise UserError(f"sweep.resume = {resume}: no such sweep directory",
                            "Give the directory of an earlier sweep, e.g. outputs/sweeps/2026-01-31_12-00-00_123456.")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if sweep_dir not in launched_sweeps:
            launched_sweeps.append(sweep_dir)
            # the sweep's config and command line, as Hydra's basic sweeper records them (the Optuna sweeper
            # does not): the pictures read the search space (log ranges, choices) from it
            OmegaConf.save(self.config, sweep_dir / RECORDED_SWEEP)
            console.print(f"[bold]sweep[/bold] {sweep_dir}" + (" (resumed)" if resume else ""))
        gpus = visible_gpus(self.gpus)
        console.print(
            f"{len(job_overrides)} job(s), {self.n_jobs} at a time" + (f" on GPUs {','.join(gpus)}" if gpus else "")
            + (f" · every job: {' '.join(sorted(self.fixed))}" if self.fixed else ""), highlight=False,
        )

        jobs: list[Job] = []
        returns: dict[int, JobReturn] = {}
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            # sweep.resume picks the sweep directory; the job itself is the same run as the first time
            job = self._job(num, [o for o in overrides if not o.startswith("sweep.resume=")], sweep_dir)
            earlier = completed_summary(job.job_dir) if resume else None
            if earlier is not None:
                self._report(job, earlier, note="completed earlier, skipped")
                returns[num] = _job_return(job, earlier)
                continue
            set_aside(job.job_dir)
            jobs.append(job)
        results = run_jobs(jobs, self.n_jobs, gpus, self.jobs_per_gpu, self.timeout, env=traceback_env(),
                           on_done=self._report)
        returns.update({job.num: _job_return(job, results[job.num]) for job in jobs})
        write_summary_files(sweep_dir)
        return [returns[num] for num in sorted(returns)]

    def _job(self, num: int, overrides: list[str], sweep_dir: Path) -> Job:
        """Compose the job's config (as Hydra's own launcher would) to name its directory and check it."""
        assert self.config is not None and self.hydra_context is not None
        try:
            job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(job_cfg):
                job_cfg.hydra.job.num = num
                job_cfg.hydra.job.id = str(num)
            name = str(job_cfg.hydra.sweep.subdir)
            monitor, mode = OmegaConf.select(job_cfg, "callbacks.monitor"), OmegaConf.select(job_cfg, "callbacks.mode")
        except Exception as err:  # the job alone fails: an unknown option, a key that does not exist, ...
            user_error = as_user_error(err)
            job_dir = sweep_dir / _dir_name(f"{num}_{self._override_dirname(overrides)}")
            return Job(num, overrides, job_dir, None, error=str(user_error or f"{type(err).__name__}: {err}"))
        job_dir = sweep_dir / _dir_name(name)
        command = job_command(self.config.hydra, job_dir, num, overrides)
        return Job(num, overrides, job_dir, command, monitor=monitor, mode=mode)

    def _override_dirname(self, overrides: list[str]) -> str:
        """Hydra's ${hydra.job.override_dirname}, for a job whose config (which holds it) did not compose."""
        assert self.config is not None
        settings = self.config.hydra.job.config.override_dirname
        parsed = OverridesParser.create().parse_overrides(overrides)
        return get_overrides_dirname(parsed, list(settings.exclude_keys), settings.item_sep, settings.kv_sep)


    def _report(self, job: Job, summary: RunSummary, note: str | None = None) -> None:
        """One line per finished job (its own overrides only), so that a long sweep shows its progress."""
        own = [o for o in job.overrides if o not in self.fixed]
        label = f"job {job.num} [cyan]{' '.join(own) or '(no overrides)'}[/cyan]"
        status = summary.status
        if status == "failed":
            reason = (summary.error or "").strip().splitlines()[:1] or [""]
            console.print(f"[red]✗[/red] {label} failed: {reason[0]} · {job.job_dir / JOB_LOG}", highlight=False)
            return
        value = summary.best_value
        shown = f"{summary.monitor} {format_value(value)}" if value is not None else "no value"
        seconds = summary.wall_seconds
        detail = note or (f"{status}, {seconds:.1f} s" if seconds is not None else status)
        console.print(f"[green]✓[/green] {label} {shown} · {detail}", highlight=False)


def _dir_name(name: str) -> str:
    """A job directory name: one path component (a '/' in a value would nest directories), not too long."""
    return name.replace("/", "_")[:_MAX_DIR_NAME]


def _job_return(job: Job, summary: RunSummary) -> JobReturn:
    """The sweeper's view of a job: the best monitored value, or a JobFailed for Optuna to mark FAIL."""
    ret = JobReturn(overrides=job.overrides, working_dir=str(job.job_dir), task_name="dlrun")
    if summary.status == "failed":
        ret.status = JobStatus.FAILED
        first_line = (summary.error or "").strip().splitlines()[:1] or ["failed"]
        ret.return_value = JobFailed(f"job {job.num} ({' '.join(job.overrides)}): {first_line[0]}")
    else:
        ret.status = JobStatus.COMPLETED
        ret.return_value = summary.best_value
    return ret
