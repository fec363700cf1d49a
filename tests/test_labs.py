"""Labs (`dlrun lab=<name>`): the verdict rules on fabricated summaries (fast), the lab files, the
command's list and errors, and every lab at quick size, trained for real (slow)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dlrun.errors import UserError
from dlrun.lab.report import write_report
from dlrun.lab.runner import read_jobs
from dlrun.lab.spec import LAB_DIR, lab_names, load_lab
from dlrun.lab.verdict import HELD, INCONCLUSIVE, NOT_HELD, LabJob, judge, parse_check, parse_quantity
from dlrun.run_summary import RunSummary
from dlrun.rundir import RunDir
from tests.conftest import Result, dlrun_in


def job(level: str, seed: int, status: str = "completed", csv: str | None = None, tmp: Path | None = None,
        last: dict | None = None, **fields) -> LabJob:
    """A job of a fabricated sweep: summary fields and metrics as given (metrics: keyword `m`)."""
    metrics = fields.pop("m", {})
    summary = RunSummary(status=status, metrics=metrics, seed=seed, last_epoch={"epoch": 9, "metrics": last or {}},
                         **fields)
    path = None
    if csv is not None:
        assert tmp is not None
        path = tmp / f"{level}_{seed}"
        path.mkdir()
        (path / "metrics.csv").write_text(csv)
    return LabJob(level=level, seed=seed, summary=summary, path=path)


XOR_RULE = [parse_check({"level": "logreg", "quantity": "test/acc", "is": "<=", "than": 0.75}),
            parse_check({"level": "mlp", "quantity": "test/acc", "is": "==", "than": 1.0})]


def xor_jobs(logreg: list[float], mlp: list[float]) -> list[LabJob]:
    return ([job("logreg", s, m={"test/acc": v}) for s, v in enumerate(logreg)]
            + [job("mlp", s, m={"test/acc": v}) for s, v in enumerate(mlp)])


# --- verdicts on fabricated summaries -------------------------------------------------------------------
def test_a_claim_that_holds_in_every_seed_is_held():
    verdict = judge(XOR_RULE, xor_jobs([0.5, 0.75, 0.5], [1.0, 1.0, 1.0]), seeds=[0, 1, 2])
    assert verdict.outcome == HELD
    assert [r.passed for r in verdict.results] == [3, 3]
    assert "logreg: test/acc ≤ 0.75 in every seed: test/acc 0.5833 ± 0.1443: 3/3 seeds pass" in verdict.line()
    named = judge(XOR_RULE, xor_jobs([0.5, 0.75, 0.5], [1.0, 1.0, 1.0]), seeds=[0, 1, 2], factor="model")
    assert named.line().startswith("held: model=logreg: test/acc ≤ 0.75 in every seed")


def test_a_claim_that_fails_in_every_seed_did_not_hold():
    verdict = judge(XOR_RULE, xor_jobs([0.5, 0.5, 0.5], [0.75, 0.75, 0.5]), seeds=[0, 1, 2])
    assert verdict.outcome == NOT_HELD
    assert [r.outcome for r in verdict.results] == [HELD, NOT_HELD]
    assert "0/3 seeds pass" in verdict.results[1].explain()


def test_seeds_that_disagree_are_inconclusive():
    verdict = judge(XOR_RULE, xor_jobs([0.5, 0.5, 0.5], [1.0, 0.75, 1.0]), seeds=[0, 1, 2])
    assert verdict.outcome == INCONCLUSIVE
    assert verdict.results[1].passed == 2 and verdict.results[1].judged == 3


def test_one_failed_check_outweighs_an_inconclusive_one():
    verdict = judge(XOR_RULE, xor_jobs([1.0, 1.0, 1.0], [1.0, 0.75, 1.0]), seeds=[0, 1, 2])
    assert [r.outcome for r in verdict.results] == [NOT_HELD, INCONCLUSIVE]
    assert verdict.outcome == NOT_HELD


def test_a_seed_without_a_value_makes_a_check_inconclusive():
    jobs = xor_jobs([0.5, 0.5], [1.0, 1.0]) + [job("logreg", 2, status="failed"), job("mlp", 2, status="failed")]
    verdict = judge(XOR_RULE, jobs, seeds=[0, 1, 2])
    assert verdict.outcome == INCONCLUSIVE
    assert verdict.results[0].missing == [2]
    assert "no value for seed(s) 2" in verdict.line()


def test_levels_compare_seed_by_seed_with_a_factor_and_a_margin():
    jobs = [job("sgd", s, last={"val/loss": v}) for s, v in enumerate([0.04, 0.05])]
    jobs += [job("momentum", s, last={"val/loss": v}) for s, v in enumerate([1e-5, 1e-3])]
    ratio = parse_check({"level": "momentum", "quantity": "last:val/loss", "is": "<", "than_level": "sgd", "times": 0.01})
    verdict = judge([ratio], jobs, seeds=[0, 1])
    assert verdict.outcome == INCONCLUSIVE  # seed 0: 1e-5 < 4e-4; seed 1: 1e-3 is not < 5e-4
    assert verdict.results[0].right == pytest.approx([4e-4, 5e-4])
    assert "< 0.01 × sgd's in every seed: last:val/loss 5.05e-04 ± 7.00e-04 vs 0.045 ± 0.007071: 1/2" in verdict.line()
    margin = parse_check({"level": "momentum", "quantity": "last:val/loss", "is": "<", "than_level": "sgd", "by": -0.03})
    assert judge([margin], jobs, seeds=[0, 1]).outcome == HELD  # < sgd's - 0.03 in both seeds


def test_the_mean_over_seeds_is_judged_once():
    check = parse_check({"level": "mlp", "quantity": "test/acc", "is": ">=", "than": 0.9, "over_seeds": "mean"})
    assert judge([check], xor_jobs([], [1.0, 0.85, 0.95]), seeds=[0, 1, 2]).outcome == HELD  # mean 0.933
    assert judge([check], xor_jobs([], [1.0, 0.7, 0.95]), seeds=[0, 1, 2]).outcome == NOT_HELD  # mean 0.883


def test_quantities_read_the_summary_and_metrics_csv(tmp_path):
    csv = "epoch,lr,val/acc,val/loss\n0,0.2,0.5,1.0\n1,0.1,0.8,0.5\n2,0.0667,0.95,0.7\n"
    j = job("a", 0, csv=csv, tmp=tmp_path, m={"val/loss": 0.5, "train/loss": 0.2}, epochs=3, best_epoch=1,
            last={"val/loss": 0.7})
    read = {q: parse_quantity(q)(j) for q in [
        "val/loss", "last:val/loss", "min:val/loss", "max:val/acc", "at_epoch:lr@1", "epochs_to:val/acc>=0.9",
        "epochs_to:val/acc>=0.99", "epochs - best_epoch", "val/loss - train/loss", "diverged", "test/acc"]}
    assert read == {"val/loss": 0.5, "last:val/loss": 0.7, "min:val/loss": 0.5, "max:val/acc": 0.95,
                    "at_epoch:lr@1": 0.1, "epochs_to:val/acc>=0.9": 3.0, "epochs_to:val/acc>=0.99": math.inf,
                    "epochs - best_epoch": 2.0, "val/loss - train/loss": pytest.approx(0.3), "diverged": 0.0,
                    "test/acc": None}
    assert parse_quantity("diverged")(job("a", 0, status="diverged")) == 1.0
    j.ensemble = {"test/acc": 0.97}  # the level's ensemble (the runner adds it from dlrun-eval's model averaging)
    j.summary.metrics["test/acc"] = 0.95
    assert parse_quantity("ensemble:test/acc - test/acc")(j) == pytest.approx(0.02)


@pytest.mark.parametrize("item, says", [
    ({"level": "a", "quantity": "test/acc", "is": "=>", "than": 1}, "'is' must be one of"),
    ({"level": "a", "quantity": "test/acc", "is": ">"}, "either 'than'"),
    ({"level": "a", "quantity": "test/acc", "is": ">", "than": 1, "than_level": "b"}, "either 'than'"),
    ({"level": "a", "quantity": "accuracy", "is": ">", "than": 1}, "not a metric"),
    ({"level": "a", "quantity": "mean:val/acc", "is": ">", "than": 1}, "unknown kind 'mean'"),
    ({"level": "a", "quantity": "epochs_to:val/acc", "is": ">", "than": 1}, "epochs_to takes"),
    ({"level": "a", "quantity": "test/acc", "is": ">", "than": 1, "seeds": "all"}, "unknown keys ['seeds']"),
])
def test_a_mistyped_check_is_refused_when_read(item, says):
    with pytest.raises(ValueError, match=None) as err:
        parse_check(item)
    assert says in str(err.value)


def test_the_report_has_the_claim_command_table_verdict_and_figures(tmp_path):
    lab = load_lab("xor")
    jobs = []
    for level, accs in (("logreg", [0.5, 0.5, 0.75]), ("mlp", [1.0, 1.0, 0.75])):
        for seed, acc in enumerate(accs):
            csv = "epoch,train/loss,val/acc\n" + "".join(f"{e},{1 / (e + 1 + seed)},{acc}\n" for e in range(4))
            jobs.append(job(level, seed, csv=csv, tmp=tmp_path, m={"test/acc": acc}))
    verdict = judge(lab.checks, jobs, lab.sizes["quick"].seeds)
    write_report(lab, "quick", tmp_path, jobs, verdict, "dlrun lab=xor")
    report = (tmp_path / "lab_report.md").read_text()
    assert lab.claim in report and lab.source in report and "`dlrun lab=xor`" in report
    assert "**Verdict: inconclusive.**" in report
    assert "| `logreg` | 3 | 3 completed | 0.5833 ± 0.1443 |" in report
    assert "| `mlp` | 2 | 0.75 |" in report  # the per-seed table
    for figure in ("lab_curves.png", "lab_measure.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({figure})" in report


def test_jobs_are_matched_to_levels_however_hydra_recorded_the_value(tmp_path):
    """Hydra records `model.batch_norm=false` as `False` and `optim.lr=1e-2` as `0.01`."""
    for num, overrides in enumerate([["model.batch_norm=False", "seed=0"], ["model.batch_norm=True", "seed=2"],
                                     ["model.batch_norm=True"], ["model=cnn", "seed=1"]]):
        RunDir(tmp_path / f"{num}_job").write_summary(RunSummary(status="completed", overrides=overrides))
    jobs = read_jobs(load_lab("batch_norm"), "quick", tmp_path)
    assert [(j.level, j.seed, j.path.name) for j in jobs] == [("false", 0, "0_job"), ("true", 2, "1_job")]


# --- the lab files --------------------------------------------------------------------------------------
def test_there_are_at_least_twelve_labs_and_each_reads_and_cites_the_notes():
    names = lab_names()
    assert len(names) >= 12, names
    for name in names:
        lab = load_lab(name)
        assert any(f"{notes} §" in lab.source for notes in ("000", "001", "002", "003", "004")), (name, lab.source)
        assert lab.sizes["quick"].takes and lab.sizes["full"].takes


def test_a_broken_lab_file_names_the_file_and_the_problem(tmp_path):
    good = yaml.safe_load((LAB_DIR / "xor.yaml").read_text())
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**good, "verdict": [{"level": "cnn", "quantity": "test/acc",
                                                                            "is": ">", "than": 0.5}]}))
    with pytest.raises(UserError) as err:
        load_lab("bad", lab_dir=tmp_path)
    assert "bad.yaml" in err.value.message and "level(s) ['cnn']" in err.value.message


# --- the command ----------------------------------------------------------------------------------------
def test_lab_list_shows_every_lab_with_its_source(run_dlrun):
    result = run_dlrun("lab=list", env={"COLUMNS": "400"})
    for name in lab_names():
        assert f"│ {name} " in result.stdout
        assert load_lab(name).source[:30] in result.stdout


def test_an_unknown_lab_exits_2_with_a_panel_listing_the_labs(run_dlrun):
    result = run_dlrun("lab=xro", check=False, env={"COLUMNS": "400"})
    assert result.returncode == 2
    assert "Unknown lab" in result.stderr and "There is no lab named 'xro'" in result.stderr
    assert all(name in result.stderr for name in lab_names())
    assert "Traceback" not in result.stderr + result.stdout
    assert not (result.output_dir / "labs").exists()


@pytest.mark.parametrize("args, says", [
    (["lab=xor", "lab.size=medium"], "a lab has the sizes quick, full"),
    (["lab=xor", "lab.seeds=3"], "lab.seeds=3: a lab takes"),
    (["lab=xor", "-m"], "a lab runs its own sweep"),
    (["lab=xor", "lab.resume=nowhere"], "no readable lab.json there"),
])
def test_bad_lab_settings_exit_2(run_dlrun, args, says):
    result = run_dlrun(*args, check=False, env={"COLUMNS": "400"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr


# --- every lab, trained at quick size -------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory) -> Callable[[str], Result]:
    """`dlrun lab=<name>` at quick size, each lab run once in its own directory for the tests that read it."""
    done: dict[str, Result] = {}

    def run(name: str) -> Result:
        if name not in done:
            done[name] = dlrun_in(tmp_path_factory.mktemp(name))(f"lab={name}", env={"COLUMNS": "400"})
        return done[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", lab_names())
def test_every_lab_holds_at_quick_size(quick_lab, name):
    result = quick_lab(name)
    lab_dir = next((result.output_dir / "labs").glob(f"{name}_quick_*"))
    verdict = json.loads((lab_dir / "lab_verdict.json").read_text())
    assert verdict["verdict"] == HELD, result.stdout[-3000:]
    assert f"{name}: held" in result.stdout
    report = (lab_dir / "lab_report.md").read_text()
    assert f"`dlrun lab={name}`" in report and "**Verdict: held.**" in report
    assert (lab_dir / "lab_curves.png").is_file() and (lab_dir / "lab_measure.png").is_file()


@pytest.mark.slow
def test_a_lab_resumes_in_its_directory_without_training_again(quick_lab):
    first = quick_lab("inverse_time")  # the run test_every_lab_holds_at_quick_size checked
    lab_dir = next((first.output_dir / "labs").glob("inverse_time_quick_*"))
    before = {p: p.stat().st_mtime_ns for p in lab_dir.glob("*/summary.json")}
    again = dlrun_in(first.output_dir.parent)(f"lab.resume={lab_dir}", env={"COLUMNS": "400"})
    assert "completed earlier, skipped" in again.stdout and "inverse_time: held" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in lab_dir.glob("*/summary.json")} == before
    assert len(list((first.output_dir / "labs").iterdir())) == 1
