"""The Optuna side of `sweep=random|tpe|qmc|cmaes`: the search space read from the command line, the study
in its storage, the pruner, and each running job's progress reported to its trial.

The study lives in a storage, not in memory: `<sweep dir>/optuna.db` (SQLite) unless `sweep.storage`
names an RDB URL (`postgresql://...`, `sqlite:////shared/study.db`) or a journal file (a plain path:
Optuna's JournalStorage, which many processes on a shared file system can append to). A sweep with
SLURM workers (sweep.workers) keeps it in the journal `<sweep dir>/optuna.journal` by default: SQLite's
locks do not hold on the network file systems that nodes share. `optuna-dashboard <storage>` shows it live. The sweeper (hydra_plugins/dlrun_launcher/dlrun_sweeper.py) asks a trial when a
launcher slot frees, and tells it when its job ends; a job reports its monitored value through the
`metrics.csv` its csv logger rewrites after every epoch, which `Progress` reads between polls.
"""

from __future__ import annotations

import contextlib
import csv
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from dlrun.curves import read_metrics
from dlrun.errors import UserError
from dlrun.run_summary import RunSummary

STUDY_FILE = "optuna.db"  # the default storage, in the sweep directory
SHARED_STUDY_FILE = "optuna.journal"  # the default storage of a sweep with workers on several nodes
_ASK_LOCK = ".ask"  # in the sweep directory: <_ASK_LOCK>.lock while a process asks for a trial
_ASK_LOCK_GRACE_SECONDS = 60  # a lock older than this is taken as its holder's death (an ask takes well under 1 s)
# sweep.pruner -> Optuna's pruner, given sweep.pruner_min_epochs and sweep.pruner_reduction. A trial's steps
# are epochs trained (1, 2, ...), so that min_epochs counts whole epochs: ASHA's rungs are at min_epochs,
# x reduction, x reduction^2 ... epochs; the median pruner waits min_epochs epochs and for 5 finished trials.
PRUNERS: dict[str, Callable[[int, int], optuna.pruners.BasePruner]] = {
    "none": lambda min_epochs, reduction: optuna.pruners.NopPruner(),
    # below the median of earlier trials at the same epoch
    "median": lambda min_epochs, reduction: optuna.pruners.MedianPruner(n_warmup_steps=min_epochs),
    # asynchronous successive halving (Li et al. 2020)
    "asha": lambda min_epochs, reduction: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=min_epochs, reduction_factor=reduction),
    # several ASHA brackets of different aggressiveness
    "hyperband": lambda min_epochs, reduction: optuna.pruners.HyperbandPruner(
        min_resource=min_epochs, reduction_factor=reduction),
}
_JOB = "job"  # the trial's user attribute: the job number (and so the job directory) it runs as

optuna.logging.set_verbosity(optuna.logging.WARNING)  # dlrun reports every job itself
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class SearchSpace:
    """What the sweep overrides ask for: Optuna distributions for the swept keys, plain values for the rest.

    interval(a,b) is uniform over the real numbers in [a, b], tag(log, interval(a,b)) log-uniform,
    range(start,stop,step) the values Hydra's range gives (stop excluded), choice(...) and a,b,c categorical.
    """

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)  # as typed: print_config=false, not print_config=False

    @classmethod
    def from_overrides(cls, arguments: Sequence[str]) -> SearchSpace:
        space = cls()
        for override in OverridesParser.create().parse_overrides(list(arguments)):
            key = override.get_key_element()
            if override.is_sweep_override():
                space.distributions[key] = _distribution(override)
            else:
                space.fixed.append(override.input_line)
        return space

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A job's overrides: the trial's values, then the fixed ones as they were given."""
        return [*(f"{key}={value}" for key, value in params.items()), *self.fixed]

    def check_sampler(self, sampler: str) -> None:
        """Refuse a space the sampler cannot search: CMA-ES needs two or more ranges and no choices,
        QMC at least one range (it spreads numbers evenly; a choice alone has nothing to spread)."""
        ranges = [k for k, d in self.distributions.items() if not isinstance(d, CategoricalDistribution)]
        choices = [k for k in self.distributions if k not in ranges]
        if sampler == "cmaes" and (choices or len(ranges) < 2):
            problem = (f"sweep=cmaes cannot search the choice(s) {', '.join(choices)}" if choices else
                       f"sweep=cmaes needs at least two ranges; this sweep has {len(ranges)}"
                       + (f" ({', '.join(ranges)})" if ranges else ""))
            raise UserError(problem, "CMA-ES adapts a covariance over two or more numeric ranges, e.g. "
                            "'optim.lr=tag(log,interval(1e-4,1e-1))' 'model.dropout=interval(0,0.5)'; "
                            "sweep=tpe or sweep=random search choices too.", title="Search space not for CMA-ES")
        if sampler == "qmc" and not ranges:
            raise UserError("sweep=qmc needs at least one range (interval or range); this sweep has "
                            + (f"only choices ({', '.join(choices)})" if choices else "nothing swept"),
                            "Give a range such as 'optim.lr=tag(log,interval(1e-4,1e-1))', or use sweep=grid "
                            "for choices alone.", title="Search space not for QMC")


def _distribution(override: Override) -> BaseDistribution:
    value = override.value()
    if isinstance(value, IntervalSweep):
        return FloatDistribution(float(value.start), float(value.end), log="log" in value.tags)  # Hydra: floats
    if isinstance(value, RangeSweep) and not value.shuffle:
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    assert isinstance(value, (ChoiceSweep, RangeSweep))  # a,b,c is a choice too
    return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))


def storage_for(setting: str | None, sweep_dir: Path, shared: bool = False) -> str | optuna.storages.BaseStorage:
    """sweep.storage: null -> `<sweep dir>/optuna.db`, or for workers on several nodes (`shared`) the journal
    `<sweep dir>/optuna.journal`; an RDB URL as it is; any other text, a journal file."""
    if setting is None and not shared:
        return f"sqlite:///{Path(sweep_dir).absolute() / STUDY_FILE}"
    setting = setting or str(Path(sweep_dir) / SHARED_STUDY_FILE)
    if "://" in setting:
        return setting
    path = Path(setting).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def open_study(storage: str | optuna.storages.BaseStorage, name: str, direction: str,
               sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The study `name` in `storage`, created or loaded (resume, other workers), with this sweep's sampler and pruner."""
    try:
        return optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                   pruner=pruner, load_if_exists=True)
    except ValueError as err:  # a loaded study's direction differs, a bad URL, ...
        raise UserError(f"the study {name!r} in {storage}: {err}", "Name another sweep.study_name, or "
                        "resume with the sweep's own command.", title="Cannot open the study") from err
    except ImportError as err:  # the URL's database driver (psycopg2, pymysql) is not installed
        raise UserError(f"sweep.storage = {storage}: {err}", "Install the database's driver, or use a journal "
                        "file (sweep.storage=/shared/study.log).", title="Cannot open the study") from err


def ask(study: optuna.Study, space: SearchSpace) -> optuna.Trial:
    """The next trial (a queued one first), labelled with the job number it runs as."""
    trial = study.ask(space.distributions)
    trial.set_user_attr(_JOB, job_number(trial))
    return trial


@contextlib.contextmanager
def asking(sweep_dir: Path) -> Iterator[None]:
    """One process of a sweep at a time counts the study's trials and asks for the next one (a lock file in
    the sweep directory, which its workers share: Optuna's own, safe on NFS, released by force after
    _ASK_LOCK_GRACE_SECONDS if its holder died), so that workers sharing the study stop at exactly sweep.n_trials."""
    lock = optuna.storages.journal.JournalFileOpenLock(str(Path(sweep_dir) / _ASK_LOCK), _ASK_LOCK_GRACE_SECONDS)
    lock.acquire()
    try:
        yield
    finally:
        with contextlib.suppress(RuntimeError):  # an ask slower than the grace: another process took the lock
            lock.release()


def job_number(trial: optuna.trial.BaseTrial) -> int:
    """The job a trial runs as: its own number, or the job it takes over from an interrupted sweep."""
    return int(trial.user_attrs.get(_JOB, trial.number))


def requeue_interrupted(study: optuna.Study) -> int:
    """On sweep.resume: the trials left running by a sweep that was stopped are closed (FAIL) and queued
    again with their parameters and job number, so that their jobs run (or continue) in the same
    directories. Returns how many."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={_JOB: job_number(trial)}, skip_if_exists=False)
    return len(stale)


def jobs_in(study: optuna.Study) -> int:
    """How many of the sweep's jobs the study has asked for (finished, running or queued)."""
    return len({job_number(t) for t in study.get_trials(deepcopy=False)})


def tell(study: optuna.Study, trial: optuna.Trial, summary: RunSummary) -> TrialState:
    """Record a finished job in the study: a value (COMPLETE), PRUNED, or FAIL (no value: failed, none logged)."""
    value = summary.best_value
    if summary.status == "pruned":
        state, values = TrialState.PRUNED, None
    elif summary.status in ("completed", "diverged") and value is not None and not math.isnan(value):
        state, values = TrialState.COMPLETE, [float(value)]
    else:
        state, values = TrialState.FAIL, None
    trial.set_user_attr("status", summary.status)
    study.tell(trial, values, state=state, skip_if_finished=True)
    return state


class Progress:
    """A running job's best monitored value so far, after each epoch, read from its metrics.csv and reported
    to its trial. The best so far, not the epoch's own: the job's result is its best epoch (summary.json's
    best_value, its best checkpoint), and one noisy epoch of a good job must not get it pruned."""

    def __init__(self, trial: optuna.Trial, job_dir: Path, monitor: str):
        self.trial, self.path, self.monitor = trial, Path(job_dir) / "metrics.csv", monitor
        self._better = min if trial.study.direction == optuna.study.StudyDirection.MINIMIZE else max
        self._seen: tuple[int, int] | None = None  # (mtime, size) of the file last read
        self._reported: set[int] = set()

    def report(self) -> tuple[int, float] | None:
        """Report the epochs logged since the last call; (epoch, best value so far) of the newest one, if any."""
        try:
            stat = self.path.stat()
        except OSError:
            return None
        if self._seen == (stat.st_mtime_ns, stat.st_size):
            return None
        self._seen = (stat.st_mtime_ns, stat.st_size)
        try:
            columns = read_metrics(self.path)  # rewritten atomically by the job: never half a file
        except (OSError, ValueError, csv.Error):  # gone, or not what a dlrun job writes: nothing to report
            return None
        newest, best = None, None
        for epoch, value in zip(columns.get("epoch", []), columns.get(self.monitor, []), strict=False):
            if not math.isfinite(value):
                continue
            best = value if best is None else self._better(best, value)
            if int(epoch) not in self._reported:
                self.trial.report(best, step=int(epoch) + 1)  # the epochs trained
                self._reported.add(int(epoch))
                newest = (int(epoch), best)
        return newest

    def prune(self) -> dict[str, Any] | None:
        """{epoch, value} (the best value so far) when the pruner stops the trial after its newest epoch, else None."""
        newest = self.report()
        if newest is None or not self.trial.should_prune():
            return None
        return {"epoch": newest[0], "value": newest[1]}
