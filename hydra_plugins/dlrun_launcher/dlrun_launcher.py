"""dlrun's Hydra launcher (`hydra/launcher=dlrun`, the default for `dlrun -m`).

Hydra's basic launcher runs every job inside the sweep's own process: one job's crash, out-of-memory
kill, W&B run or DDP re-launch then spoils the rest. This launcher composes each job's config here
(a job whose overrides cannot be composed fails alone, before any process starts), then runs the job
as a plain `dlrun` run in a process of its own (`dlrun.sweep.launcher`; forked from a warm fork server
where that is safe, `dlrun.sweep.fork_server`), and answers the sweeper with the job's best monitored
value, which is what the Optuna sweeper optimizes (`launch_each` hands it each result as the job ends,
and lets it stop a job its pruner gives up on).

Hydra only instantiates launchers defined under the `hydra_plugins` namespace package, hence this file;
the machinery lives in `dlrun/sweep/`.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.markup import escape

import dlrun.sweep  # noqa: F401  (registers the ${dlrun.coalesce:...} resolver of conf/hydra/default.yaml)
from dlrun.command_line import as_typed, job_command, job_resume_command, sweep_command
from dlrun.config import parse_rule, validate
from dlrun.console import console, format_value
from dlrun.error_boundary import as_user_error, traceback_env
from dlrun.errors import UserError
from dlrun.run_summary import RunSummary
from dlrun.sweep.fork_server import ForkServer
from dlrun.sweep.launcher import JOB_LOG, Job, launched_sweeps, run_jobs, sigterm_interrupts, visible_gpus
from dlrun.sweep.pictures import RECORDED_SWEEP
from dlrun.sweep.resume import check_sweep_command, earlier_attempt, set_aside
from dlrun.sweep.summary import write_summary_files

_MAX_DIR_NAME = 200  # file systems allow 255 bytes per name; long override lists are cut
FORK_SERVER_LOG = ".fork_server.log"  # in the sweep directory: why the fork server stopped, if it did


class JobFailed(Exception):
    """What a sweeper gets from a failed job's JobReturn: the job's number, overrides and error."""


class DlrunLauncher(Launcher):
    """Runs each job as `python -m dlrun.cli <overrides> hydra.run.dir=<job dir>`, `n_jobs` at a time."""

    _KNOBS = {
        "n_jobs": parse_rule("int >= 1"),
        "timeout": parse_rule("float > 0 | null"),
        "jobs_per_gpu": parse_rule("int >= 1"),
        "retries": parse_rule("int >= 0"),
        "fork_server": parse_rule("bool"),
    }

    def __init__(self, n_jobs: int = 1, timeout: float | None = None, gpus: Any = None, jobs_per_gpu: int = 1,
                 retries: int = 1, fork_server: bool = True):
        values = {"n_jobs": n_jobs, "timeout": timeout, "jobs_per_gpu": jobs_per_gpu, "retries": retries,
                  "fork_server": fork_server}
        problems = [
            f"hydra.launcher.{key} = {values[key]!r}: expected {rule.describe()}"
            for key, rule in self._KNOBS.items()
            if not rule.accepts(values[key])
        ]
        if gpus is not None and not parse_rule("list of int >= 0").accepts(list(gpus) or [0]):
            problems.append(f"hydra.launcher.gpus = {gpus!r}: expected a list of GPU ids (or null: all visible)")
        if problems:
            raise UserError("\n".join(problems), "Fix the launcher setting, e.g. hydra.launcher.n_jobs=2.")
        self.n_jobs, self.timeout, self.jobs_per_gpu, self.retries = n_jobs, timeout, jobs_per_gpu, retries
        self.use_fork_server = fork_server
        self.fork_server: ForkServer | None = None  # started at the first launch, for the whole sweep
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

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        sweep_dir, resume = self.sweep_dir()
        gpus = visible_gpus(self.gpus)
        self._announce(f"{len(job_overrides)} job(s)", gpus)
        jobs: list[Job] = []
        returns: dict[int, JobReturn] = {}
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            job, earlier = self._job_to_run(num, overrides, sweep_dir, resume)
            if earlier is not None:
                returns[num] = _job_return(job, earlier)
                continue
            jobs.append(job)
        with sigterm_interrupts():
            results = run_jobs(jobs, self.n_jobs, gpus, self.jobs_per_gpu, self.timeout, env=traceback_env(),
                               on_done=self._report, fork_server=self.fork_server)
        returns.update({job.num: _job_return(job, results[job.num]) for job in jobs})
        write_summary_files(sweep_dir)
        return [returns[num] for num in sorted(returns)]

    def launch_each(
        self,
        job_overrides: Iterable[tuple[int, Sequence[str]]],
        on_done: Callable[[Job, RunSummary], None],
        prune: Callable[[Job], dict[str, Any] | None] | None = None,
    ) -> None:
        """Run jobs as `job_overrides` hands them out, (number, overrides) one at a time when a slot frees,
        and tell `on_done` each job's summary as soon as it ends: what an asking sweeper (Optuna's ask and
        tell) needs, where `launch` takes a whole batch. `prune` may stop a running job (see run_jobs)."""
        sweep_dir, resume = self.sweep_dir()
        gpus = visible_gpus(self.gpus)
        self._announce("jobs as trials are asked", gpus)

        def jobs() -> Iterator[Job]:
            for num, overrides in job_overrides:
                job, earlier = self._job_to_run(num, overrides, sweep_dir, resume)
                if earlier is not None:
                    on_done(job, earlier)
                else:
                    yield job

        def done(job: Job, summary: RunSummary) -> None:
            self._report(job, summary)
            on_done(job, summary)

        try:
            with sigterm_interrupts():
                run_jobs(jobs(), self.n_jobs, gpus, self.jobs_per_gpu, self.timeout, env=traceback_env(),
                         on_done=done, prune=prune, fork_server=self.fork_server)
        finally:
            write_summary_files(sweep_dir)

    def sweep_dir(self) -> tuple[Path, bool]:
        """The sweep's directory (made, and announced once), and whether the sweep resumes it."""
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        resume = OmegaConf.select(self.config, "sweep.resume")
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        if resume and not sweep_dir.is_dir():
            raise UserError(f"sweep.resume = {resume}: no such sweep directory",
                            "Give the directory of an earlier sweep, e.g. outputs/sweeps/2026-01-31_12-00-00_123456.")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if sweep_dir not in launched_sweeps:
            check_sweep_command(sweep_dir, sweep_command(self.config.hydra), resuming=bool(resume))
            launched_sweeps.append(sweep_dir)
            # the sweep's config and command line, as Hydra's basic sweeper records them (the Optuna sweeper
            # does not): the pictures read the search space (log ranges, choices) from it
            OmegaConf.save(self.config, sweep_dir / RECORDED_SWEEP)
            console.print(f"[bold]sweep[/bold] {sweep_dir}" + (" (resumed)" if resume else ""))
            self._start_fork_server(sweep_dir)  # it imports while the jobs are composed
        return sweep_dir, bool(resume)

    def _announce(self, what: str, gpus: list[str]) -> None:
        console.print(
            f"{what}, {self.n_jobs} at a time" + (f" on GPUs {','.join(gpus)}" if gpus else "")
            + (f" · every job: {escape(' '.join(sorted(self.fixed)))}" if self.fixed else ""), highlight=False,
        )

    def _job_to_run(self, num: int, overrides: Sequence[str], sweep_dir: Path,
                    resume: bool) -> tuple[Job, RunSummary | None]:
        """The job, and on resume its earlier summary when that is its result (a finished job, or one that
        failed more than `retries` times: skipped, and reported so). An interrupted job with a checkpoint
        continues (`dlrun resume=<job dir>`); any other earlier attempt is set aside and the job runs afresh."""
        assert self.config is not None
        # sweep.resume picks the sweep directory; the job itself is the same run as the first time. Its overrides
        # as the user typed them, not as Hydra's grid sweeper escapes them (http\://...), in every record of it
        job = self._job(num, [as_typed(o) for o in overrides if not o.startswith("sweep.resume=")], sweep_dir)
        earlier = earlier_attempt(job.job_dir, self.retries) if resume else None
        if earlier is not None and earlier.action in ("skip", "give_up"):
            assert earlier.summary is not None
            note = (f"{earlier.summary.status} earlier, skipped" if earlier.action == "skip" else
                    f"failed {earlier.failures} times, not retried (hydra.launcher.retries={self.retries})")
            self._report(job, earlier.summary, note=note)
            return job, earlier.summary
        if earlier is not None and earlier.action == "continue" and job.command is not None:
            job.command, job.continues = job_resume_command(self.config.hydra, job.job_dir), True
        else:
            set_aside(job.job_dir)
        return job, None

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
        hardware = {key: OmegaConf.select(job_cfg, f"hardware.{key}", default=None)
                    for key in ("accelerator", "strategy", "devices", "num_nodes")}
        forkable = (hardware["accelerator"] in ("cpu", "auto") and hardware["strategy"] == "auto"  # not DDP, whose
                    and str(hardware["devices"]) in ("1", "auto") and hardware["num_nodes"] == 1)  # ranks re-run argv
        return Job(num, overrides, job_dir, command, monitor=monitor, mode=mode, forkable=forkable)

    def _start_fork_server(self, sweep_dir: Path) -> None:
        """Start the sweep's fork server, unless it is off or forking is not safe on this machine: not Linux,
        or GPUs visible (jobs fork before CUDA starts, but dlrun keeps CUDA machines on fresh processes)."""
        if self.fork_server is not None or not self.use_fork_server:
            return
        if not sys.platform.startswith("linux") or visible_gpus(None):
            self.use_fork_server = False
            return
        env = {**os.environ, **traceback_env(), "PYTHONUNBUFFERED": "1"}  # what a job's imports see
        self.fork_server = ForkServer(env, stderr=sweep_dir / FORK_SERVER_LOG)
        atexit.register(self.fork_server.close)

    def _override_dirname(self, overrides: list[str]) -> str:
        """Hydra's ${hydra.job.override_dirname}, for a job whose config (which holds it) did not compose."""
        assert self.config is not None
        settings = self.config.hydra.job.config.override_dirname
        parsed = OverridesParser.create().parse_overrides(overrides)
        return get_overrides_dirname(parsed, list(settings.exclude_keys), settings.item_sep, settings.kv_sep)


    def _report(self, job: Job, summary: RunSummary, note: str | None = None) -> None:
        """One line per finished job (its own overrides only), so that a long sweep shows its progress."""
        own = [o for o in job.overrides if o not in self.fixed]
        label = f"job {job.num} [cyan]{escape(' '.join(own)) or '(no overrides)'}[/cyan]"  # logger=[csv,x]: not markup
        status = summary.status
        if status == "pruned" and summary.pruned:
            value = summary.pruned.get("value")
            console.print(f"[yellow]✂[/yellow] {label} pruned after epoch {summary.pruned.get('epoch')}: "
                          f"{summary.monitor} {format_value(value)}", highlight=False)
            return
        if status == "failed":
            reason = (summary.error or "").strip().splitlines()[:1] or [""]
            console.print(f"[red]✗[/red] {label} failed: {reason[0]} · " + (f"{note} · " if note else "")
                          + str(job.job_dir / JOB_LOG), highlight=False)
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
