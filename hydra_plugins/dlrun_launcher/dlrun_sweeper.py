"""dlrun's Optuna sweeper (`sweep=random|tpe|qmc|cmaes`): ask a trial, run it as a job, tell its result.

With dlrun's launcher a trial is asked for as soon as a slot frees (`DlrunLauncher.launch_each`), so
one slow trial never idles the others, and every running job's monitored value is reported to its
trial after each epoch, so that the pruner (sweep.pruner) can stop it. Another launcher (hydra/launcher=
slurm, basic) gets batches of trials through Hydra's `launch`, without pruning. The study is kept in a
storage (SQLite `<sweep dir>/optuna.db` by default), so `sweep.resume=<sweep dir>` goes on with it.

With `sweep.workers=N` (and hydra/launcher=slurm) this process submits N SLURM jobs instead, each running
`work`: the same ask-as-slots-free loop with dlrun's launcher, one trial at a time, on the study they
share (a journal file in the sweep directory by default), until it holds n_trials; then it reports the
sweep as if it had run every job itself.

Hydra only instantiates sweepers defined under the `hydra_plugins` namespace package, hence this file;
the Optuna side lives in `dlrun/sweep/study.py`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import setup_globals
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from dlrun.config import parse_rule
from dlrun.console import console
from dlrun.errors import UserError
from dlrun.run_summary import RunSummary
from dlrun.sweep.launcher import Job, sigterm_interrupts
from dlrun.sweep.study import (
    PRUNERS,
    Progress,
    SearchSpace,
    ask,
    asking,
    job_number,
    jobs_in,
    open_study,
    requeue_interrupted,
    storage_for,
    tell,
)
from hydra_plugins.dlrun_launcher import slurm_container as slurm
from hydra_plugins.dlrun_launcher.dlrun_launcher import DlrunLauncher

RESULTS_FILE = "optimization_results.yaml"  # the best trial, as hydra-optuna-sweeper wrote it
_SAMPLER_NAMES = {"RandomSampler": "random", "TPESampler": "tpe", "QMCSampler": "qmc", "CmaEsSampler": "cmaes"}
_WORKER_POLL_SECONDS = 2.0  # how often the submitting process looks whether its workers have ended


class DlrunOptunaSweeper(Sweeper):
    """Optuna's ask and tell over dlrun's search-space grammar, with a persistent study and pruning."""

    def __init__(self, sampler: functools.partial, direction: str, n_trials: int, storage: str | None,
                 study_name: str | None, pruner: str, pruner_min_epochs: int, pruner_reduction: int,
                 workers: int | None = None):
        if not parse_rule("int >= 1 | null").accepts(workers):
            raise UserError(f"sweep.workers = {workers!r}: expected an int >= 1 (or null: no workers)",
                            "Give the number of SLURM jobs that share the study, e.g. sweep.workers=4.")
        self.sampler, self.direction, self.n_trials = sampler, direction, n_trials
        self.storage, self.study_name, self.pruner, self.workers = storage, study_name, pruner, workers
        self.pruner_settings = (pruner_min_epochs, pruner_reduction)
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        space = SearchSpace.from_overrides(arguments)
        space.check_sampler(_SAMPLER_NAMES.get(self.sampler.func.__name__, ""))
        pruning = self.pruner != "none"
        if pruning and "csv" not in (self.config.get("logger") or {}):
            raise UserError(f"sweep.pruner={self.pruner} reads every job's metrics.csv, which logger=csv writes; "
                            "this sweep's loggers leave it out.", "Keep csv among the loggers, e.g. "
                            "logger=[csv,wandb].", title="Pruning needs metrics.csv")
        if self.workers is not None:
            self._run_workers(space, pruning)
            return
        if isinstance(self.launcher, DlrunLauncher):
            sweep_dir, resume = self.launcher.sweep_dir()  # checked, made and announced
        else:
            sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
            resume = OmegaConf.select(self.config, "sweep.resume") is not None
            sweep_dir.mkdir(parents=True, exist_ok=True)
        study = self._study(sweep_dir, resume)
        if isinstance(self.launcher, DlrunLauncher):
            self._ask_as_slots_free(study, space, pruning, sweep_dir)
        else:
            self._ask_in_batches(study, space)
        self._write_results(study, sweep_dir)

    def _study(self, sweep_dir: Path, resume: bool, worker: int | None = None) -> optuna.Study:
        """The sweep's study, opened with this process's sampler; on resume, the trials left running queued
        again (by the submitting process only: the running trials a worker sees are its fellow workers')."""
        storage = storage_for(self.storage, sweep_dir, shared=self.workers is not None)
        study = open_study(storage, self.study_name or sweep_dir.name, self.direction, self.sampler(),
                           PRUNERS[self.pruner](*self.pruner_settings))
        if resume and worker is None:
            requeued = requeue_interrupted(study)
            if requeued:
                console.print(f"{requeued} trial(s) the sweep left running are queued again")
        already, seed = len(study.trials), self.sampler.keywords.get("seed")
        # a study with trials (resumed, or shared with other workers) draws new points, not the seed's first ones
        # again, and each worker its own ones; QMC's points follow the trial count already (shared by the
        # workers through the study), and its seed picks the sequence
        if seed is not None and self.sampler.func is not optuna.samplers.QMCSampler:
            if worker is not None:
                study.sampler = self.sampler(seed=int(np.random.SeedSequence([seed, already, worker]).generate_state(1)[0]))
            elif already:
                study.sampler = self.sampler(seed=seed + already)
        return study

    def _to_ask(self, study: optuna.Study) -> int:
        """Trials still to ask: queued ones, and new ones until the study holds sweep.n_trials jobs. Asked
        again before every trial, so that workers sharing a study (the same storage and study name) stop
        together, at n_trials (give or take the trials asked at the same moment)."""
        waiting = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
        return waiting + max(0, self.n_trials - jobs_in(study))

    def _ask_as_slots_free(self, study: optuna.Study, space: SearchSpace, pruning: bool, sweep_dir: Path,
                           worker: str | None = None) -> None:
        """dlrun's launcher: one trial per free slot; each running job reports to its trial, told as it ends.
        A SLURM worker labels its trials with `worker`, its job id (user attribute)."""
        assert isinstance(self.launcher, DlrunLauncher) and self.config is not None
        trials: dict[int, optuna.Trial] = {}
        progress: dict[int, Progress] = {}
        monitor = str(self.config.callbacks.monitor)

        def asked() -> Iterator[tuple[int, list[str]]]:
            while True:
                with asking(sweep_dir):  # the count and the ask as one step among the sweep's processes
                    if self._to_ask(study) <= 0:
                        return
                    trial = ask(study, space)
                if worker is not None:
                    trial.set_user_attr("worker", worker)
                trials[job_number(trial)] = trial
                yield job_number(trial), space.overrides(trial.params)

        def prune(job: Job) -> dict[str, Any] | None:
            if job.num not in progress:
                progress[job.num] = Progress(trials[job.num], job.job_dir, monitor)
            return progress[job.num].prune()

        def done(job: Job, summary: RunSummary) -> None:
            trial = trials[job.num]
            if summary.status != "pruned":  # the epochs logged since the last poll count for the pruner too
                (progress.get(job.num) or Progress(trial, job.job_dir, monitor)).report()
            trial.set_user_attr("job_dir", str(job.job_dir))
            tell(study, trial, summary)

        self.launcher.launch_each(asked(), done, prune if pruning else None)

    def _ask_in_batches(self, study: optuna.Study, space: SearchSpace) -> None:
        """Another launcher (SLURM, Hydra's basic): batches of the jobs it runs at once, told together."""
        assert self.launcher is not None and self.config is not None
        launcher = self.config.hydra.launcher
        batch = int(launcher.get("n_jobs") or launcher.get("array_parallelism") or 1)
        while (to_ask := self._to_ask(study)) > 0:
            trials = [ask(study, space) for _ in range(min(batch, to_ask))]
            returns = self.launcher.launch([space.overrides(t.params) for t in trials],
                                           initial_job_idx=job_number(trials[0]))
            for trial, ret in zip(trials, returns, strict=True):
                value = ret.return_value if ret.status.name == "COMPLETED" else None
                summary = RunSummary(status="completed" if isinstance(value, (int, float)) else "failed",
                                     best_value=float(value) if isinstance(value, (int, float)) else None)
                tell(study, trial, summary)

    def _run_workers(self, space: SearchSpace, pruning: bool) -> None:
        """sweep.workers: submit that many SLURM jobs running `work`, wait for them (cancel them if this
        process is stopped), and leave the report to the end of the sweep, as for a sweep run here."""
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        self._check_workers()
        # dlrun's launcher, without jobs of its own here: it checks the config and the command (on resume),
        # records the sweep, and names it for the report at the end of `dlrun -m`
        recorder = DlrunLauncher(fork_server=False)
        recorder.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
        sweep_dir, resume = recorder.sweep_dir()
        study = self._study(sweep_dir, resume)
        if self._to_ask(study) > 0:
            work = functools.partial(self.work, space, pruning, Singleton.get_state())
            self._wait_for(self.launcher.submit_workers(work, self.workers), sweep_dir)
        self._write_results(study, sweep_dir)

    def _check_workers(self) -> None:
        """Refuse, before anything is submitted, what SLURM workers cannot run."""
        assert self.config is not None
        # hydra/launcher=slurm's ContainerSlurmLauncher (Hydra loads that plugin module apart: no isinstance)
        if not hasattr(self.launcher, "submit_workers"):
            raise UserError(f"sweep.workers={self.workers} submits SLURM jobs; this sweep's launcher is "
                            f"{type(self.launcher).__name__}.", "Add hydra/launcher=slurm, or leave sweep.workers "
                            "out and run trials side by side here with hydra.launcher.n_jobs.",
                            title="Workers need SLURM")
        if (self.storage or "").startswith("sqlite"):
            raise UserError(f"sweep.storage={self.storage} with sweep.workers: SQLite's locks do not hold on the "
                            "network file systems that SLURM nodes share, and workers writing at once can corrupt it.",
                            "Leave sweep.storage out (the workers share a journal file in the sweep directory), "
                            "or name a journal file (sweep.storage=/shared/study.journal) or a database server "
                            "(postgresql://...).", title="SQLite is not for many workers")
        hardware = {key: OmegaConf.select(self.config, f"hardware.{key}") for key in ("devices", "num_nodes")}
        if hardware["num_nodes"] != 1 or str(hardware["devices"]) not in ("1", "auto"):
            raise UserError(f"hardware.devices={hardware['devices']} hardware.num_nodes={hardware['num_nodes']} "
                            "with sweep.workers: a worker is one SLURM task on one node, running its trials "
                            "one at a time on one device.", "Use one device per job, or leave sweep.workers out: "
                            "hydra/launcher=slurm then runs every trial as a SLURM job of its own (DDP tasks "
                            "included).", title="Workers run one-device jobs")

    def _wait_for(self, jobs: list, sweep_dir: Path) -> None:
        """Wait for the workers' SLURM jobs; cancel them on Ctrl-C or SIGTERM (each running trial then saves its
        last checkpoint, from which sweep.resume continues it). Workers that failed: a line each, then a panel."""
        console.print(f"{len(jobs)} SLURM workers ask and run the trials: jobs {', '.join(j.job_id for j in jobs)}"
                      f" · their logs: {jobs[0].paths.stdout.parent.parent}", highlight=False)
        try:
            with sigterm_interrupts():
                while slurm.still_queued(jobs):
                    time.sleep(_WORKER_POLL_SECONDS)
        except BaseException:
            slurm.cancel(jobs)
            raise
        failed = 0
        for job in jobs:
            why = slurm.failure(job)
            if why is not None:
                failed += 1
                console.print(f"[red]✗[/red] worker {job.job_id} {why} · {job.paths.stderr}", highlight=False)
        if failed:
            raise UserError(f"{failed} of {len(jobs)} SLURM workers failed (above); the trials they were "
                            "running are left unfinished.", "See their logs; continue the sweep (its unfinished "
                            f"trials run again) with sweep.resume={sweep_dir}.", title="SLURM workers failed")

    def work(self, space: SearchSpace, pruning: bool, singleton_state: dict, worker: int) -> None:
        """What each SLURM worker runs: ask, run (dlrun's launcher, one job at a time, pruned as a sweep here
        is) and tell trials of the shared study until it holds n_trials. Each trial records the worker's SLURM
        job id (user attribute `worker`), as submitit and squeue show it (<array job>_<worker>)."""
        import submitit

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        Singleton.set_state(singleton_state)  # Hydra's config store and plugins, as the submitting process had them
        setup_globals()
        self.launcher = DlrunLauncher(n_jobs=1)
        self.launcher.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
        sweep_dir, resume = self.launcher.sweep_dir()
        study = self._study(sweep_dir, resume, worker=worker)
        self._ask_as_slots_free(study, space, pruning, sweep_dir, worker=submitit.JobEnvironment().job_id)

    def _write_results(self, study: optuna.Study, sweep_dir: Path) -> None:
        """optimization_results.yaml: the best trial's parameters and value (none when no trial completed)."""
        try:
            best = study.best_trial
        except ValueError:  # no completed trial
            return
        results = {"name": "optuna", "study_name": study.study_name, "best_job": job_number(best),
                   "best_params": best.params, "best_value": best.value}
        (sweep_dir / RESULTS_FILE).write_text(yaml.safe_dump(results, sort_keys=False))
