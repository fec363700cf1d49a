"""dlrun's Optuna sweeper (hydra_plugins/dlrun_launcher/dlrun_sweeper.py, dlrun/sweep/study.py): the search-space
grammar, the study in its SQLite storage, pruning, resume, and trials asked as launcher slots free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from dlrun import CONF_DIR
from dlrun.errors import UserError
from dlrun.sweep.launcher import Job, run_jobs
from dlrun.sweep.study import PRUNERS, STUDY_FILE, Progress, SearchSpace

QUIET = ["print_config=false", "callbacks.progress_bar=false", "callbacks.model_summary=false"]


def _sweep_dir(output_dir: Path) -> Path:
    (sweep_dir,) = [p for p in (output_dir / "sweeps").iterdir() if p.is_dir()]
    return sweep_dir


def _study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / STUDY_FILE}")


def _summaries(sweep_dir: Path) -> dict[int, dict]:
    found = (json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json"))
    return {s["sweep_job"]["num"]: s for s in found}


def test_the_search_space_grammar_reaches_optuna_as_distributions():
    space = SearchSpace.from_overrides([
        "optim.lr=tag(log,interval(1e-4,1e-1))", "model.dropout=interval(0,0.5)", "model.depth=interval(1,4)",
        "model.width=range(32,257,32)", "model=mlp,cnn", "optim=choice(sgd,adam)", "print_config=false",
    ])
    d = space.distributions
    assert d["optim.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert d["model.dropout"] == FloatDistribution(0.0, 0.5)
    assert d["model.depth"] == FloatDistribution(1.0, 4.0)  # an interval is real numbers: range(1,5) for integers
    assert d["model.width"] == IntDistribution(32, 256, step=32)  # Hydra's range: the stop is left out
    assert d["model"] == CategoricalDistribution(["mlp", "cnn"]) and d["optim"] == CategoricalDistribution(["sgd", "adam"])
    assert space.fixed == ["print_config=false"]  # as typed
    assert space.overrides({"optim.lr": 0.01, "model": "cnn"}) == ["optim.lr=0.01", "model=cnn", "print_config=false"]


@pytest.mark.parametrize(("sampler", "overrides", "message"), [
    ("cmaes", ["optim.lr=tag(log,interval(1e-4,1e-1))", "model=mlp,cnn"], "cannot search the choice(s) model"),
    ("cmaes", ["optim.lr=tag(log,interval(1e-4,1e-1))"], "needs at least two ranges; this sweep has 1 (optim.lr)"),
    ("qmc", ["model=mlp,cnn"], "needs at least one range"),
])
def test_samplers_refuse_a_space_they_cannot_search(sampler, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SearchSpace.from_overrides(overrides).check_sampler(sampler)
    two_ranges = SearchSpace.from_overrides(["optim.lr=tag(log,interval(1e-4,1e-1))", "model.dropout=interval(0,0.5)"])
    two_ranges.check_sampler(sampler)  # both take two ranges


def test_a_trial_is_asked_for_as_soon_as_a_slot_frees(tmp_path):
    """run_jobs reads its jobs one at a time: with two slots, the third job is asked for when the quick second
    one ends, while the slow first one still runs (a batch of two would wait for the slow one)."""
    asked_at: dict[int, float] = {}
    command = {0: "import time; time.sleep(4)", 1: "pass", 2: "pass"}

    def jobs():
        for num in range(3):
            asked_at[num] = time.time()
            yield Job(num, [], tmp_path / str(num), [sys.executable, "-c", command[num]])

    results = run_jobs(jobs(), n_jobs=2)
    finished = {num: results[num].sweep_job["process_finished_at"] for num in results}
    started = {num: results[num].sweep_job["process_started_at"] for num in results}
    assert started[2] >= finished[1] and started[2] < finished[0]  # ISO timestamps, UTC: they sort as times
    assert asked_at[2] > asked_at[1]


def _write_metrics(job_dir: Path, values: list[float]) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    rows = ["epoch,val/loss", *(f"{epoch},{value}" for epoch, value in enumerate(values))]
    (job_dir / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_a_job_reports_its_best_value_so_far_after_each_epoch_trained(tmp_path):
    """One noisy epoch (0.9 after 0.4) is not what the pruner sees: the job's result is its best epoch."""
    study = optuna.create_study(direction="minimize")
    trial = study.ask()
    _write_metrics(tmp_path / "0", [1.0, 0.4, 0.9, 0.3])
    assert Progress(trial, tmp_path / "0", "val/loss").report() == (3, 0.3)
    assert study.trials[0].intermediate_values == {1: 1.0, 2: 0.4, 3: 0.4, 4: 0.3}  # steps: epochs trained


def test_asha_decides_first_after_pruner_min_epochs_and_keeps_one_in_pruner_reduction(tmp_path):
    study = optuna.create_study(direction="minimize", pruner=PRUNERS["asha"](2, 3))
    for num, values in enumerate([[0.7, 0.4, 0.3], [0.6, 0.3, 0.2], [0.5, 0.2, 0.1]]):  # each the best so far
        trial = study.ask()
        progress = Progress(trial, tmp_path / str(num), "val/loss")
        for epochs in range(1, len(values) + 1):  # polled after each epoch, as the launcher does
            _write_metrics(tmp_path / str(num), values[:epochs])
            assert progress.prune() is None
        study.tell(trial, min(values))
    poor, good = study.ask(), study.ask()
    _write_metrics(tmp_path / "poor", [0.3])
    _write_metrics(tmp_path / "good", [0.9])
    poor_progress = Progress(poor, tmp_path / "poor", "val/loss")
    good_progress = Progress(good, tmp_path / "good", "val/loss")
    assert poor_progress.prune() is None and good_progress.prune() is None  # one epoch: before the first rung
    _write_metrics(tmp_path / "poor", [0.3, 0.35])  # best 0.3 after two epochs: not the first of four at the rung
    _write_metrics(tmp_path / "good", [0.9, 0.15])  # best 0.15: the first of five
    assert poor_progress.prune() == {"epoch": 1, "value": 0.3}
    assert good_progress.prune() is None


@pytest.mark.slow
@pytest.mark.parametrize(("args", "says"), [
    (["sweep=cmaes", "model=mlp,cnn"], "sweep=cmaes cannot search the choice(s) model"),
    (["sweep=random", "sweep.pruner=asha", "logger=tensorboard"], "sweep.pruner=asha reads every job's metrics.csv"),
], ids=["cmaes-on-a-choice", "pruning-without-metrics-csv"])
def test_a_sweep_the_sweeper_cannot_run_is_refused_before_any_job(run_dlrun, args, says):
    result = run_dlrun("-m", *args, "sweep.n_trials=2", "optim.lr=tag(log,interval(1e-4,1e-1))", "debug=fast",
                       check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert says in out and "Traceback" not in out
    assert not any((result.output_dir / "sweeps").glob("*/*/summary.json"))


@pytest.mark.slow
def test_asha_prunes_poor_trials_and_the_study_records_every_trial(run_dlrun):
    """Seed 0 draws lr 1e-5, 0.05, 1e-5: the third job is far behind the second after two epochs, and ASHA
    stops it; its summary says pruned (and when), it keeps its last checkpoint, and the sweep succeeds.
    30 epochs, although the rung is at 2: a tiny job runs an epoch faster than a busy machine's launcher polls,
    and with 8 it finished before its SIGTERM arrived."""
    result = run_dlrun("-m", "sweep=random", "sweep.n_trials=3", "sweep.seed=0", "sweep.pruner=asha",
                       "optim.lr=choice(0.05,0.00001)", "dataset.n_train=300", "trainer.max_epochs=30",
                       "callbacks.early_stopping.enabled=false", *QUIET)
    sweep_dir = _sweep_dir(result.output_dir)
    jobs = _summaries(sweep_dir)
    assert [jobs[n]["overrides"][0] for n in range(3)] == ["optim.lr=1e-05", "optim.lr=0.05", "optim.lr=1e-05"]
    assert [jobs[n]["status"] for n in range(3)] == ["completed", "completed", "pruned"]
    pruned = jobs[2]
    assert 1 <= pruned["pruned"]["epoch"] < 29 and pruned["epochs"] < 30
    assert Path(pruned["checkpoints"]["last"]).is_file()
    assert "pruned after epoch" in result.stdout

    trials = sorted(_study(sweep_dir).trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    for trial in trials:
        job = jobs[trial.user_attrs["job"]]
        assert trial.params["optim.lr"] == float(job["overrides"][0].split("=")[1])
        assert Path(trial.user_attrs["job_dir"]).name == Path(job["run_dir"]).name
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(job["best_value"])
            assert len(trial.intermediate_values) == 30  # every epoch reported
    assert max(trials[2].intermediate_values) >= pruned["pruned"]["epoch"]
    document = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert document["counts"] == {"completed": 2, "pruned": 1}


@pytest.mark.slow
def test_resume_continues_the_study_and_reruns_only_what_was_left_running(run_dlrun):
    lr = "optim.lr=tag(log,interval(1e-3,1e-1))"
    first = run_dlrun("-m", "sweep=tpe", "sweep.n_trials=2", "sweep.n_startup_trials=2", lr, "debug=fast", *QUIET)
    sweep_dir = _sweep_dir(first.output_dir)
    before = _summaries(sweep_dir)
    # a sweep killed while a job ran leaves that trial RUNNING: ask one here, as that sweep did, and never tell it
    study = _study(sweep_dir)
    left = study.ask({"optim.lr": FloatDistribution(1e-3, 1e-1, log=True)})
    left.set_user_attr("job", left.number)

    run_dlrun("-m", "sweep=tpe", "sweep.n_trials=4", "sweep.n_startup_trials=2", lr, "debug=fast", *QUIET,
              f"sweep.resume={sweep_dir}")
    after = _summaries(sweep_dir)
    for num in (0, 1):  # completed: not run again
        assert after[num]["sweep_job"]["process_started_at"] == before[num]["sweep_job"]["process_started_at"]
    trials = sorted(_study(sweep_dir).trials, key=lambda t: t.number)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.FAIL) == 1  # the stale one, closed
    rerun = next(t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs["job"] == left.number)
    assert rerun.number != left.number and rerun.params == left.params  # the same job, asked again
    assert after[left.number]["status"] == "completed"
    assert sorted(after) == sorted({t.user_attrs["job"] for t in trials})


@pytest.mark.slow
def test_two_workers_share_one_study_in_a_journal_file(tmp_path):
    """The same command started twice on one journal file, study name and sweep directory: both workers
    ask and tell the one study until it holds sweep.n_trials jobs, each job in its own directory."""
    journal, sweep_dir = tmp_path / "study.log", tmp_path / "sweep"
    env = {**os.environ, "DLRUN_OUTPUT_DIR": str(tmp_path / "outputs"), "COLUMNS": "120"}
    command = [sys.executable, "-m", "dlrun.cli", "-m", "sweep=random", "sweep.n_trials=4", f"sweep.storage={journal}",
               "sweep.study_name=shared", f"hydra.sweep.dir={sweep_dir}", "optim.lr=tag(log,interval(1e-3,1e-1))",
               "debug=fast", *QUIET]
    workers = [subprocess.Popen([*command, f"sweep.seed={seed}"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    outputs = [worker.communicate(timeout=900)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="shared",
                              storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))))
    trials = study.trials
    assert len(trials) == 4  # counted and asked under the sweep directory's lock: never one too many
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(_summaries(sweep_dir)) == sorted(t.number for t in trials)  # one directory per trial
    assert all("✓ job" in out for out in outputs), outputs  # both workers ran trials
    assert not (sweep_dir / STUDY_FILE).exists()  # the journal holds the study


@pytest.mark.slow
@pytest.mark.parametrize(("args", "says"), [
    (["sweep=random", "sweep.workers=0", "hydra/launcher=slurm"], "sweep.workers = 0: expected an int >= 1"),
    (["sweep=random", "sweep.workers=2"], "sweep.workers=2 submits SLURM jobs"),
    (["sweep=grid", "sweep.workers=2", "model=mlp,logreg"], "sweep.workers"),
    (["sweep=random", "sweep.workers=2", "hydra/launcher=slurm", "sweep.storage=sqlite:///study.db"],
     "SQLite's locks do not hold"),
    (["sweep=random", "sweep.workers=2", "hydra/launcher=slurm", "hardware=ddp_cpu"], "a worker is one SLURM task"),
], ids=["no-workers", "not-on-slurm", "grid", "sqlite", "ddp"])
def test_workers_the_sweep_cannot_have_are_refused_before_any_job(run_dlrun, args, says):
    """sweep.workers: bad values, a launcher other than SLURM, Hydra's grid sweeper (which has no such key),
    SQLite shared by nodes, multi-device jobs: a panel and exit code 2, before anything is submitted."""
    result = run_dlrun("-m", *args, "sweep.n_trials=2", "optim.lr=0.01,0.1", "debug=fast", check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert says in out and "Traceback" not in out
    assert not list((result.output_dir / "sweeps").glob("*"))  # no sweep directory, nothing submitted


@pytest.mark.slow
def test_another_launcher_gets_the_trials_in_batches(run_dlrun):
    """hydra/launcher=basic (jobs in the sweep's process) has no launch_each: the sweeper hands it batches
    through Hydra's launch and tells the study what each job returned."""
    result = run_dlrun("-m", "hydra/launcher=basic", "sweep=random", "sweep.n_trials=2",
                       "optim.lr=tag(log,interval(1e-3,1e-1))", "debug=fast", *QUIET)
    sweep_dir = _sweep_dir(result.output_dir)
    trials = _study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 and [t.user_attrs["job"] for t in trials] == [0, 1]
    for trial in trials:
        (summary,) = sweep_dir.glob(f"{trial.number}_*/summary.json")
        assert trial.value == pytest.approx(json.loads(summary.read_text())["best_value"])


@pytest.mark.parametrize("sweep", ["random", "tpe", "qmc", "cmaes"])
def test_every_sampler_option_builds_its_sampler_and_searches_two_ranges(sweep):
    """conf/hydra/sweeper/sampler/<name>.yaml, as the sweeper gets it (a partial it seeds), asks and is told."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        startup = ["sweep.n_startup_trials=1"] if sweep in ("tpe", "cmaes") else []  # their model after one trial
        cfg = compose("config", overrides=[f"sweep={sweep}", *startup], return_hydra_config=True)
    sampler = instantiate(cfg.hydra.sweeper.sampler)
    assert sampler.func.__name__.lower().startswith({"cmaes": "cmaes", "qmc": "qmc"}.get(sweep, sweep))
    space = SearchSpace.from_overrides(["optim.lr=tag(log,interval(1e-4,1e-1))", "model.dropout=interval(0,0.5)"])
    space.check_sampler(sweep)
    study = optuna.create_study(sampler=sampler(seed=3))
    for _ in range(4):
        trial = study.ask(space.distributions)
        study.tell(trial, trial.params["optim.lr"] + trial.params["model.dropout"])
    assert all(1e-4 <= t.params["optim.lr"] <= 1e-1 and 0 <= t.params["model.dropout"] <= 0.5 for t in study.trials)
    assert len({t.params["optim.lr"] for t in study.trials}) == 4
