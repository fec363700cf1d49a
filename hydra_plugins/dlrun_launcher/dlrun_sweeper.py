"""dlrun's Optuna sweeper (`sweep=random|tpe|qmc|cmaes`): ask a trial, run it as a job, tell its result.

With dlrun's launcher a trial is asked for as soon as a slot frees (`DlrunLauncher.launch_each`), so
one slow trial never idles the others, and every running job's monitored value is reported to its
trial after each epoch, so that the pruner (sweep.pruner) can stop it. Another launcher (hydra/launcher=
slurm, basic) gets batches of trials through Hydra's `launch`, without pruning. The study is kept in a
storage (SQLite `<sweep dir>/optuna.db` by default), so `sweep.resume=<sweep dir>` goes on with it.

Hydra only instantiates sweepers defined under the `hydra_plugins` namespace package, hence this file;
the Optuna side lives in `dlrun/sweep/study.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from dlrun.console import console
from dlrun.errors import UserError
from dlrun.run_summary import RunSummary
from dlrun.sweep.launcher import Job
from dlrun.sweep.study import (
    PRUNERS,
    Progress,
    SearchSpace,
    ask,
    job_number,
    jobs_in,
    open_study,
    requeue_interrupted,
    storage_for,
    tell,
)
from hydra_plugins.dlrun_launcher.dlrun_launcher import DlrunLauncher

RESULTS_FILE = "optimization_results.yaml"  # the best trial, as hydra-optuna-sweeper wrote it
_SAMPLER_NAMES = {"RandomSampler": "random", "TPESampler": "tpe", "QMCSampler": "qmc", "CmaEsSampler": "cmaes"}


class DlrunOptunaSweeper(Sweeper):
    """Optuna's ask and tell over dlrun's search-space grammar, with a persistent study and pruning."""

    def __init__(self, sampler: functools.partial, direction: str, n_trials: int, storage: str | None,
                 study_name: str | None, pruner: str, pruner_min_epochs: int, pruner_reduction: int):
        self.sampler, self.direction, self.n_trials = sampler, direction, n_trials
        self.storage, self.study_name, self.pruner = storage, study_name, pruner
        self.pruner_settings = (pruner_min_epochs, pruner_reduction)
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
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
        if isinstance(self.launcher, DlrunLauncher):
            sweep_dir, resume = self.launcher.sweep_dir()  # checked, made and announced
        else:
            sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
            resume = OmegaConf.select(self.config, "sweep.resume") is not None
            sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = storage_for(self.storage, sweep_dir)
        study = open_study(storage, self.study_name or sweep_dir.name, self.direction, self.sampler(),
                           PRUNERS[self.pruner](*self.pruner_settings))
        if resume:
            requeued = requeue_interrupted(study)
            if requeued:
                console.print(f"{requeued} trial(s) the sweep left running are queued again")
        already, seed = len(study.trials), self.sampler.keywords.get("seed")
        # a study with trials (resumed, or shared with other workers) draws new points, not the seed's first ones
        # again; QMC's points follow the trial count already, and its seed picks the sequence
        if already and seed is not None and self.sampler.func is not optuna.samplers.QMCSampler:
            study.sampler = self.sampler(seed=seed + already)
        if isinstance(self.launcher, DlrunLauncher):
            self._ask_as_slots_free(study, space, pruning)
        else:
            self._ask_in_batches(study, space)
        self._write_results(study, sweep_dir)

    def _to_ask(self, study: optuna.Study) -> int:
        """Trials still to ask: queued ones, and new ones until the study holds sweep.n_trials jobs. Asked
        again before every trial, so that workers sharing a study (the same storage and study name) stop
        together, at n_trials (give or take the trials asked at the same moment)."""
        waiting = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
        return waiting + max(0, self.n_trials - jobs_in(study))

    def _ask_as_slots_free(self, study: optuna.Study, space: SearchSpace, pruning: bool) -> None:
        """dlrun's launcher: one trial per free slot; each running job reports to its trial, told as it ends."""
        assert isinstance(self.launcher, DlrunLauncher) and self.config is not None
        trials: dict[int, optuna.Trial] = {}
        progress: dict[int, Progress] = {}
        monitor = str(self.config.callbacks.monitor)

        def asked() -> Iterator[tuple[int, list[str]]]:
            while self._to_ask(study) > 0:
                trial = ask(study, space)
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

    def _write_results(self, study: optuna.Study, sweep_dir: Path) -> None:
        """optimization_results.yaml: the best trial's parameters and value (none when no trial completed)."""
        try:
            best = study.best_trial
        except ValueError:  # no completed trial
            return
        results = {"name": "optuna", "study_name": study.study_name, "best_job": job_number(best),
                   "best_params": best.params, "best_value": best.value}
        (sweep_dir / RESULTS_FILE).write_text(yaml.safe_dump(results, sort_keys=False))
