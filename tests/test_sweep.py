"""Sweeps: every job its own process, failures recorded, resume, summaries (dlrun/sweep, hydra_plugins)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from dlrun import CONF_DIR
from dlrun.run import build_experiment
from dlrun.sweep import pictures
from dlrun.sweep import summary as sweep_summary
from dlrun.sweep.launcher import Job, run_jobs
from dlrun.sweep.study import SearchSpace

FAST = ["debug=fast", "dataset.n_train=300"]


def _sweep_dirs(output_dir: Path) -> list[Path]:
    return sorted(p for p in (output_dir / "sweeps").iterdir() if p.is_dir())


def _jobs(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


@pytest.mark.slow
def test_grid_runs_in_parallel_and_resume_runs_only_missing_jobs(run_dlrun):
    result = run_dlrun("-m", "model=mlp,cnn", "optim=sgd,adam", *FAST, "hydra.launcher.n_jobs=2")
    (sweep_dir,) = _sweep_dirs(result.output_dir)
    jobs = _jobs(sweep_dir)
    assert sorted(jobs) == [
        "0_dataset.n_train=300,debug=fast,model=mlp,optim=sgd",
        "1_dataset.n_train=300,debug=fast,model=mlp,optim=adam",
        "2_dataset.n_train=300,debug=fast,model=cnn,optim=sgd",
        "3_dataset.n_train=300,debug=fast,model=cnn,optim=adam",
    ]
    assert all(s["status"] == "completed" for s in jobs.values())
    # each job is a run of its own: its own process, the run-directory contract in its job dir
    assert len({s["sweep_job"]["command"][-2] for s in jobs.values()}) == 4
    for name, s in jobs.items():
        assert Path(s["run_dir"]).name == name
        assert (sweep_dir / name / "config.yaml").exists() and (sweep_dir / name / "checkpoints/best.ckpt").exists()

    # two at a time: jobs 0 and 1 started together, so their processes overlapped
    first, second = (jobs[n]["sweep_job"] for n in sorted(jobs)[:2])
    assert _time(first["process_started_at"]) < _time(second["process_finished_at"])
    assert _time(second["process_started_at"]) < _time(first["process_finished_at"])
    later = jobs[sorted(jobs)[2]]["sweep_job"]  # the third waited for a free place
    assert _time(later["process_started_at"]) >= min(_time(first["process_finished_at"]),
                                                     _time(second["process_finished_at"]))

    # the summary files hold one row per job with each job's own values
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [(r["model"], r["optim"]) for r in rows] == [("mlp", "sgd"), ("mlp", "adam"), ("cnn", "sgd"), ("cnn", "adam")]
    document = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert document["monitor"] == "val/loss" and document["mode"] == "min" and document["swept"] == ["model", "optim"]
    for row, job in zip(document["jobs"], (jobs[n] for n in sorted(jobs)), strict=True):
        assert row["best_value"] == pytest.approx(job["best_value"])
        assert float(rows[row["job"]]["best_value"]) == pytest.approx(job["best_value"])
        assert row["test"]["test/acc"] == pytest.approx(job["metrics"]["test/acc"])
        assert row["epochs"] == job["epochs"] == 1
    assert (sweep_dir / "sweep_plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep_dir / "sweep_curves.png").read_bytes()[:4] == b"\x89PNG"  # every job's learning curve
    assert "val/loss (min)" in result.stdout
    # an 80-column terminal shows the headline test metrics whole; the CSV keeps every one
    narrow = subprocess.run([sys.executable, "-m", "dlrun.sweep.summary", str(sweep_dir)], capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "80"}, check=True).stdout
    table = narrow.split("every test metric")[0]
    assert "…" not in table and "test/loss" in table and "test/acc" in table and "test/f1" not in table
    assert {"test/f1", "test/precision", "test/recall", "test/dead_relu"} <= set(rows[0])

    # resume: job 3 "was killed" (no summary), job 1 failed; the re-run runs those two only
    killed = sweep_dir / sorted(jobs)[3]
    (killed / "summary.json").unlink()
    failed = sweep_dir / sorted(jobs)[1]
    (failed / "summary.json").write_text(json.dumps({**jobs[failed.name], "status": "failed", "error": "x"}))
    resumed = run_dlrun("-m", "model=mlp,cnn", "optim=sgd,adam", *FAST, "hydra.launcher.n_jobs=2",
                        f"sweep.resume={sweep_dir}")
    assert _sweep_dirs(result.output_dir) == [sweep_dir]
    after = _jobs(sweep_dir)
    assert sorted(after) == sorted(jobs)
    for name in (sorted(jobs)[0], sorted(jobs)[2]):  # untouched
        assert after[name]["sweep_job"]["process_started_at"] == jobs[name]["sweep_job"]["process_started_at"]
    for name in (killed.name, failed.name):  # run again
        assert after[name]["status"] == "completed"
        assert _time(after[name]["sweep_job"]["process_started_at"]) > _time(jobs[name]["finished_at"])
    assert (sweep_dir / ".attempts" / f"{failed.name}.1" / "summary.json").exists()  # the old attempt is kept
    assert resumed.stdout.count("completed earlier, skipped") == 2
    document = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert document["counts"] == {"completed": 4}


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_others_finish(run_dlrun):
    result = run_dlrun("-m", "optim.lr=0.05,-1", *FAST, "hydra.launcher.n_jobs=2", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    (sweep_dir,) = _sweep_dirs(result.output_dir)
    jobs = _jobs(sweep_dir)
    good = jobs["0_dataset.n_train=300,debug=fast,optim.lr=0.05"]
    bad = jobs["1_dataset.n_train=300,debug=fast,optim.lr=-1"]
    assert good["status"] == "completed" and math.isfinite(good["best_value"])
    assert bad["status"] == "failed" and bad["sweep_job"]["returncode"] == 2
    assert "optim.lr = -1: expected a number > 0" in bad["error"]  # the job's own message, without its box
    assert "│" not in bad["error"]
    rows = {r["job"]: r for r in csv.DictReader((sweep_dir / "sweep_summary.csv").open())}
    assert rows["0"]["status"] == "completed" and rows["1"]["status"] == "failed"
    assert "expected a number > 0" in rows["1"]["error"] and rows["1"]["best_value"] == ""
    assert "job 1 failed" in result.stdout


@pytest.mark.slow
def test_random_search_samples_log_scale_and_tpe_maximizes_the_monitor(run_dlrun):
    lr = "optim.lr=tag(log,interval(1e-4,1e-1))"
    result = run_dlrun("-m", "sweep=random", "sweep.n_trials=2", lr, "model.width=choice(16,32)", *FAST,
                       "hydra.launcher.n_jobs=2")
    (sweep_dir,) = _sweep_dirs(result.output_dir)
    rows = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    assert [r["status"] for r in rows] == ["completed"] * 2
    assert all(1e-4 <= r["params"]["optim.lr"] <= 1e-1 for r in rows)
    assert {r["params"]["model.width"] for r in rows} <= {16, 32}
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(r["best_value"] for r in rows))  # direction: val/loss, min

    # TPE, maximizing: the direction comes from callbacks.mode; trial 3 is chosen by TPE (2 startup trials)
    tpe = run_dlrun("-m", "sweep=tpe", "sweep.n_trials=3", "sweep.n_startup_trials=2", lr, *FAST,
                    "callbacks.monitor=val/acc", "callbacks.mode=max", "hydra.launcher.n_jobs=2")
    tpe_dir = next(d for d in _sweep_dirs(tpe.output_dir) if d != sweep_dir)
    document = json.loads((tpe_dir / "sweep_summary.json").read_text())
    assert document["monitor"] == "val/acc" and document["mode"] == "max"
    assert [r["status"] for r in document["jobs"]] == ["completed"] * 3
    results = yaml.safe_load((tpe_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(r["best_value"] for r in document["jobs"]))


def test_log_interval_override_is_a_log_uniform_search_space():
    """The command-line syntax reaches Optuna as a log-uniform distribution: samples spread over decades."""
    parsed = SearchSpace.from_overrides(["optim.lr=tag(log,interval(1e-4,1e-1))", "model.width=choice(64,128)"])
    space, fixed = parsed.distributions, parsed.fixed
    assert isinstance(space["optim.lr"], optuna.distributions.FloatDistribution) and space["optim.lr"].log
    assert space["model.width"].choices == (64, 128) and fixed == []
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    samples = [study.ask({"lr": space["optim.lr"]}).params["lr"] for _ in range(300)]
    decades = [sum(10.0**e <= s < 10.0 ** (e + 1) for s in samples) for e in (-4, -3, -2)]
    assert all(70 <= n <= 130 for n in decades), decades  # about 100 per decade, not 90% in the top one


@pytest.mark.slow
@pytest.mark.parametrize("search", [["seed=0,1"], ["sweep=random", "sweep.n_trials=2", "optim.lr=interval(0.01,0.1)"]],
                         ids=["grid", "optuna"])
def test_a_value_with_colons_reaches_every_job_as_typed(search, run_dlrun, tmp_path):
    """A fixed value with ':' in it (a path here; a URL alike): every job reads that file, and records the
    override as typed, not as Hydra's grid sweeper escapes it for the command line (a\\:b)."""
    table = tmp_path / "a:b" / "table.csv"
    table.parent.mkdir()
    table.write_text("\n".join(["x1,x2,label", *(f"{i % 7},{i % 5},{i % 2}" for i in range(120))]) + "\n")
    typed = f"dataset.path={table}"
    result = run_dlrun("-m", *search, "dataset=csv", typed, "dataset.target=label", "logger=[csv]", "debug=fast",
                       "print_config=false", "callbacks.progress_bar=false")
    (sweep_dir,) = _sweep_dirs(result.output_dir)
    jobs = _jobs(sweep_dir).values()
    assert len(jobs) == 2 and {s["status"] for s in jobs} == {"completed"}
    for job in jobs:
        assert typed in job["overrides"] and typed in job["sweep_job"]["command"]
    assert "a\\:b" not in result.stdout and "logger=[csv]" in result.stdout  # shown as typed, not read as markup


def test_timeout_stops_a_job_and_records_it(tmp_path):
    job = Job(0, ["sleep=30"], tmp_path / "0_sleep", [sys.executable, "-c", "import time; print('hi'); time.sleep(30)"])
    ok = Job(1, ["x=1"], tmp_path / "1_x", [sys.executable, "-c", "print('done')"])
    results = run_jobs([job, ok], n_jobs=2, timeout=1.0)
    assert results[0].status == "failed" and results[0].error.startswith("timed out")
    assert "hi" in results[0].error and results[0].sweep_job["process_seconds"] < 15
    # a process that exits 0 without a summary.json did not run an experiment: recorded as failed
    assert results[1].status == "failed" and "exited with code 0" in results[1].error
    assert json.loads((tmp_path / "0_sleep" / "summary.json").read_text())["status"] == "failed"


def test_gpus_are_handed_out_round_robin(tmp_path):
    show = [sys.executable, "-c", "import os; print('GPU=' + os.environ['CUDA_VISIBLE_DEVICES'])"]
    jobs = [Job(i, [], tmp_path / str(i), show) for i in range(4)]
    results = run_jobs(jobs, n_jobs=4, gpus=["0", "1"], jobs_per_gpu=1)
    assert [results[i].sweep_job["gpu"] for i in range(4)] == ["0", "1", "0", "1"]
    assert (tmp_path / "2" / "job.log").read_text().strip() == "GPU=0"


def _write_job(sweep_dir: Path, num: int, overrides: list[str], status: str, best: float | None, acc: float) -> None:
    name = f"{num}_" + ",".join(sorted(overrides))
    (sweep_dir / name).mkdir(parents=True)
    summary = {"status": status, "monitor": "val/loss", "mode": "min", "overrides": overrides, "best_value": best,
               "epochs": 3, "wall_seconds": 1.5, "metrics": {"test/acc": acc, "val/loss": best},
               "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:00:01+00:00"}
    if status == "failed":
        summary["error"] = "exited with code 1\nRuntimeError: boom"
    (sweep_dir / name / "summary.json").write_text(json.dumps(summary))


def test_summary_ranks_jobs_and_aggregates_seeds(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    values = {("mlp", 1): 0.30, ("mlp", 2): 0.50, ("mlp", 3): 0.40, ("cnn", 1): 0.20, ("cnn", 2): 0.10}
    for num, ((model, seed), value) in enumerate(values.items()):
        _write_job(sweep_dir, num, [f"model={model}", f"seed={seed}"], "completed", value, 1 - value)
    _write_job(sweep_dir, 5, ["model=cnn", "seed=3"], "failed", None, 0.0)
    (sweep_dir / ".attempts" / "9_x").mkdir(parents=True)  # set-aside attempts are not jobs
    (sweep_dir / ".attempts" / "9_x" / "summary.json").write_text("{}")

    sweep_summary.main([str(sweep_dir)])
    document = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert [r["job"] for r in document["jobs"]] == [0, 1, 2, 3, 4, 5]
    assert document["swept"] == ["model", "seed"] and document["counts"] == {"completed": 5, "failed": 1}
    groups = {g["config"]: g for g in document["seed_groups"]}
    assert groups["model=mlp"]["n"] == 3 and groups["model=mlp"]["seeds"] == [1, 2, 3]
    assert groups["model=mlp"]["best_value_mean"] == pytest.approx(0.4)
    assert groups["model=mlp"]["best_value_std"] == pytest.approx(0.1)  # sample std of 0.3, 0.5, 0.4
    assert groups["model=cnn"]["best_value_mean"] == pytest.approx(0.15)
    assert groups["model=cnn"]["best_value_std"] == pytest.approx(math.sqrt(0.005))
    assert groups["model=cnn"]["test/acc_mean"] == pytest.approx(0.85)
    ranked = sweep_summary.ranked(document["jobs"], "min")
    assert [r["job"] for r in ranked] == [4, 3, 0, 2, 1, 5]  # best first, the failed job last
    out = capsys.readouterr().out
    assert "mean ± std over seeds" in out and "0.4 ± 0.1" in out and "RuntimeError: boom" in out
    assert (sweep_dir / "sweep_plot.png").exists() and (sweep_dir / "sweep_history.png").exists()
    assert not (sweep_dir / "sweep_importance.png").exists()  # 5 completed jobs: too few for importances
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert rows[5]["error"] == "exited with code 1 / RuntimeError: boom"


def test_sweep_curves_draw_every_job_that_logged_an_epoch_and_mark_pruned_ones(tmp_path):
    """sweep_curves.png: one validation curve per job from its metrics.csv, the best bold, a pruned job dotted
    with a cross where it was stopped (its summary's status, whether or not this dlrun sets it)."""
    jobs = []
    for num, (lr, losses, status) in enumerate([(0.1, [1.0, 0.6, 0.5], "completed"), (0.01, [1.2, 1.1], "pruned"),
                                                (1.0, [], "failed")]):
        job_dir = tmp_path / f"{num}_optim.lr={lr}"
        job_dir.mkdir()
        rows = "".join(f"{epoch},{loss},{loss + 0.1}\n" for epoch, loss in enumerate(losses))
        (job_dir / "metrics.csv").write_text("epoch,val/loss,train/loss\n" + rows)
        jobs.append({"job": num, "dir": job_dir.name, "status": status, "best_value": min(losses) if losses else None,
                     "overrides": f"optim.lr={lr}", "params": {"optim.lr": lr}})
    [ax] = pictures.draw_curves(tmp_path, jobs, "val/loss", "min").axes
    best, pruned, cross = ax.get_lines()
    assert list(best.get_ydata()) == [1.0, 0.6, 0.5] and best.get_linewidth() > pruned.get_linewidth()
    assert pruned.get_linestyle() == ":" and pruned.get_label().endswith("(pruned)")
    assert cross.get_marker() == "x" and list(cross.get_xdata()) == [1.0]  # stopped after epoch 1
    assert "1 pruned" in ax.figure._suptitle.get_text()
    assert pictures.draw_curves(tmp_path, jobs[2:], "val/loss") is None  # no job logged an epoch: no figure
    written = pictures.write_pictures(tmp_path, jobs, ["optim.lr"], "val/loss", "min")
    assert {p.name for p in written} == {"sweep_history.png", "sweep_plot.png", "sweep_curves.png"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


@pytest.mark.slow
def test_sweep_pictures_log_axis_seed_categories_history_and_importances(run_dlrun):
    """A real 8-trial random search over a log-range learning rate and a seed choice: every picture is drawn,
    the learning rate on a log axis, the seeds as categories, and Optuna's importances over both keys."""
    result = run_dlrun("-m", "sweep=random", "sweep.n_trials=8", "optim.lr=tag(log,interval(1e-3,1e-1))",
                       "seed=choice(0,1,2)", *FAST, "trainer.max_epochs=2", "hydra.launcher.n_jobs=2")
    (sweep_dir,) = _sweep_dirs(result.output_dir)
    for name in ("sweep_history.png", "sweep_plot.png", "sweep_curves.png", "sweep_importance.png"):
        assert (sweep_dir / name).read_bytes()[:4] == b"\x89PNG", name
        assert name in result.stdout
    rows = sweep_summary.collect(sweep_dir)
    assert [r["status"] for r in rows] == ["completed"] * 8
    keys = sweep_summary.swept_keys(rows)
    kinds = pictures.axis_kinds(sweep_dir, rows, keys)
    assert kinds == {"optim.lr": "log", "seed": "categorical"}  # read from the sweep's recorded command line

    lr_ax, seed_ax = pictures.draw_params(rows, keys, kinds, "val/loss").axes
    assert lr_ax.get_xscale() == "log" and seed_ax.get_xscale() == "linear"
    seeds = sorted({r["params"]["seed"] for r in rows})
    assert [t.get_text() for t in seed_ax.get_xticklabels()] == [str(s) for s in seeds]
    points = seed_ax.collections[0].get_offsets()
    for (x, y), row in zip(points, rows, strict=True):  # each job's point sits in its seed's column
        assert abs(x - seeds.index(row["params"]["seed"])) <= 0.15 and y == pytest.approx(row["best_value"])

    [history] = pictures.draw_history(rows, "val/loss", "min").axes
    [best_so_far] = history.get_lines()
    steps = list(best_so_far.get_ydata())
    assert steps == sorted(steps, reverse=True) and steps[-1] == pytest.approx(min(r["best_value"] for r in rows))
    assert list(best_so_far.get_xdata()) == list(range(8))  # launch order

    evaluator, importances = pictures.param_importances(rows, keys, kinds, "min")
    assert evaluator in ("fANOVA", "mean decrease in impurity")
    assert set(importances) == {"optim.lr", "seed"} and sum(importances.values()) == pytest.approx(1.0)
    assert pictures.param_importances(rows[:7], keys, kinds, "min") is None  # too few completed jobs

    # a job whose summary says pruned (as the pruning launcher writes it) is drawn as pruned
    job_summary = sweep_dir / rows[3]["dir"] / "summary.json"
    job_summary.write_text(json.dumps({**json.loads(job_summary.read_text()), "status": "pruned"}))
    sweep_summary.main([str(sweep_dir)])
    rows = sweep_summary.collect(sweep_dir)
    [history] = pictures.draw_history(rows, "val/loss", "min").axes
    labels = {c.get_label(): len(c.get_offsets()) for c in history.collections}
    assert labels == {"completed": 7, "pruned": 1}
    [curves] = pictures.draw_curves(sweep_dir, rows, "val/loss").axes
    assert [line.get_label().endswith("(pruned)") for line in curves.get_lines() if line.get_marker() != "x"] == \
        [i == 3 for i in range(8)]


def test_sweep_config_group_and_unique_sweep_dirs():
    """sweep=tpe selects Optuna's TPE through its sampler group; sweep dirs carry microseconds."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["sweep=tpe", "callbacks.mode=max"], return_hydra_config=True)
        first = compose("config", return_hydra_config=True)
        second = compose("config", return_hydra_config=True)
        resumed = compose("config", overrides=["sweep.resume=/tmp/old_sweep"], return_hydra_config=True)
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.hydra.sweeper.n_trials == cfg.sweep.n_trials
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.dlrun_launcher.dlrun_sweeper.DlrunOptunaSweeper"
    assert cfg.hydra.sweeper.storage is None and cfg.hydra.sweeper.pruner == "none"  # <sweep dir>/optuna.db, no pruning
    assert cfg.hydra.launcher._target_ == "hydra_plugins.dlrun_launcher.dlrun_launcher.DlrunLauncher"
    assert first.hydra.sweep.dir != second.hydra.sweep.dir  # composed microseconds apart
    assert first.hydra.sweep.dir.rsplit("_", 1)[1].isdigit() and len(first.hydra.sweep.dir.rsplit("_", 1)[1]) == 6
    assert resumed.hydra.sweep.dir == "/tmp/old_sweep"


@pytest.mark.slow
def test_bad_launcher_setting_fails_before_any_job(run_dlrun):
    result = run_dlrun("-m", "optim.lr=0.1,0.01", "hydra.launcher.n_jobs=0", check=False)
    assert result.returncode == 2
    assert "hydra.launcher.n_jobs = 0: expected an integer >= 1" in result.stdout + result.stderr
    assert not (result.output_dir / "sweeps").exists() or not any((result.output_dir / "sweeps").glob("*/*/"))


# --- ensembles over seeds (004 §5.7): dlrun-eval on a sweep directory ------------------------------------
@pytest.mark.slow
def test_seed_ensemble_averages_the_members_probabilities(run_dlrun, tmp_path):
    """`dlrun -m seed=0,1,2 dataset.split_seed=0` then `dlrun-eval <sweep>`: each member's numbers are its
    own run's test metrics, and the ensemble's are those of the mean softmax, recomputed here by hand."""
    result = run_dlrun("-m", "hydra/launcher=basic", "seed=0,1,2", "dataset.split_seed=0", "dataset.n_train=300",
                       "model.width=32", "trainer.max_epochs=4")  # jobs in one process: torch loads once
    (sweep_dir,) = _sweep_dirs(result.output_dir)
    evaluated = subprocess.run([sys.executable, "-m", "dlrun.evaluate", str(sweep_dir)], capture_output=True,
                               text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((sweep_dir / "ensemble_test.json").read_text())
    assert len(report["members"]) == 3 and "ensemble of 3" in evaluated.stdout

    probabilities = []
    for member in report["members"]:
        run_dir = Path(member["run_dir"])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert member["metrics"] == pytest.approx({k: v for k, v in summary["metrics"].items()
                                                   if k.startswith("test/")}, rel=1e-5)
        datamodule, _, module = build_experiment(OmegaConf.load(run_dir / "config.yaml"), summary["choices"])
        module.load_state_dict(torch.load(member["checkpoint"], weights_only=False)["state_dict"])
        module.eval()
        x, y = datamodule.splits["test"]
        with torch.no_grad():
            probabilities.append(F.softmax(module(x), dim=-1))
    mean = torch.stack(probabilities).mean(0)
    ensemble = report["ensemble"]
    assert ensemble["test/acc"] == pytest.approx((mean.argmax(-1) == y).double().mean().item(), abs=1e-6)
    assert ensemble["test/loss"] == pytest.approx(F.nll_loss(mean.log(), y).item(), rel=1e-5)
    # Jensen: the loss of the mean probability is at most the members' mean loss
    assert ensemble["test/loss"] <= report["member_mean"]["test/loss"] + 1e-9
    members = [m["metrics"]["test/loss"] for m in report["members"]]
    assert report["member_mean"]["test/loss"] == pytest.approx(sum(members) / 3)

    # runs that split the data differently share no test split: refused, exit 2, nothing written
    other = run_dlrun("seed=5", "dataset.n_train=300", "model.width=32", "trainer.max_epochs=1")
    refused = subprocess.run([sys.executable, "-m", "dlrun.evaluate", report["members"][0]["run_dir"],
                              str(other.run_dir), "--json", str(tmp_path / "e.json")],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "Members see different data" in refused.stderr
    assert "data seed" in refused.stderr and "split_seed" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "e.json").exists()
