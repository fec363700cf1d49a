"""summary.json (dlrun/run_summary.py), the command lines of a single run (dlrun/command_line.py) and the
error boundary the CLI and the sweep launcher share (dlrun/error_boundary.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dlrun.command_line import SWEEP_ONLY, as_typed, job_command, quoted, rank_command
from dlrun.run_summary import SCHEMA_VERSION, RunSummary
from dlrun.rundir import RunDir, read_summary_file
from dlrun.sweep import summary as sweep_summary

# Written by dlrun before summary.json had a schema_version (a sweep's completed job, and the record the
# launcher writes for a job that exited with code 2), copied as they were.
OLD = Path(__file__).parent / "data" / "old_summaries"


@pytest.mark.parametrize("name", ["completed_sweep_job", "failed_sweep_job"])
def test_a_summary_written_before_schema_versions_still_reads(name, tmp_path):
    original = json.loads((OLD / f"{name}.json").read_text())
    summary = read_summary_file(OLD / f"{name}.json")
    assert summary is not None and summary.schema_version == 0 and summary.extra == {}
    assert summary.status == original["status"] and summary.overrides == original["overrides"]
    assert summary.metrics == original.get("metrics", {}) and summary.sweep_job == original["sweep_job"]
    assert summary.best_value == original.get("best_value") and summary.error == original.get("error")
    # written again, every key keeps its value; only the version (and, for a record without them, the
    # always-written empty metrics) are added
    RunDir(tmp_path).write_summary(summary)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert {k: written[k] for k in original} == original
    assert set(written) - set(original) <= {"schema_version", "metrics"}
    assert written["schema_version"] == SCHEMA_VERSION


def test_what_a_run_writes_reads_back_the_same_and_keys_of_a_newer_dlrun_are_kept(tmp_path):
    run_dir = RunDir(tmp_path)
    summary = RunSummary(status="completed", monitor="val/loss", mode="min", seed=3, overrides=["model=cnn"],
                         best_value=0.25, best_epoch=2, epochs=4, metrics={"test/acc": 0.5, "val/loss": 0.25})
    run_dir.write_summary(summary)
    assert run_dir.read_summary_if_any() == summary
    # a key this dlrun does not know (a newer one's): kept through a rewrite such as the launcher's
    data = json.loads(run_dir.summary_file.read_text())
    data["newer_key"] = {"val/loss": 0.3}
    run_dir.summary_file.write_text(json.dumps(data))
    again = run_dir.read_summary_if_any()
    assert again.extra == {"newer_key": {"val/loss": 0.3}}
    again.sweep_job = {"num": 0}
    run_dir.write_summary(again)
    assert json.loads(run_dir.summary_file.read_text())["newer_key"] == {"val/loss": 0.3}


def test_none_is_not_recorded_but_an_unreached_best_value_is_null(tmp_path):
    assert "error" not in RunSummary(status="completed").to_json()
    assert "best_value" not in RunSummary(status="failed").to_json()  # never trained: nothing to say
    trained = RunSummary(status="completed", epochs=3).to_json()  # trained without validation
    assert trained["best_value"] is None and trained["best_epoch"] is None


def test_a_wrongly_typed_key_reads_as_absent_and_non_numbers_leave_metrics():
    summary = RunSummary.from_json({"status": "completed", "seed": "zero", "epochs": True, "overrides": [1],
                                    "metrics": {"test/acc": 1, "note": "n/a", "val/loss": None}})
    assert (summary.seed, summary.epochs, summary.overrides) == (None, None, [])
    assert summary.metrics == {"test/acc": 1.0}


def test_a_truncated_summary_is_no_summary_everywhere(tmp_path):
    sweep_dir = tmp_path / "sweep"
    RunDir(sweep_dir / "0_a=1").write_summary(RunSummary(status="completed", overrides=["a=1"], best_value=0.5,
                                                         best_epoch=0, epochs=1))
    (sweep_dir / "1_a=2").mkdir()
    (sweep_dir / "1_a=2" / "summary.json").write_text('{"status": "compl')
    (sweep_dir / "2_a=3").mkdir()
    (sweep_dir / "2_a=3" / "summary.json").write_bytes(b"\x00\x01binary")
    assert RunDir(sweep_dir / "1_a=2").read_summary_if_any() is None
    assert read_summary_file(sweep_dir / "2_a=3" / "summary.json") is None
    rows = sweep_summary.collect(sweep_dir)
    # the sweep's table still shows them, as unreadable, beside the job that wrote its summary
    assert [(r["job"], r["status"]) for r in rows] == [(0, "completed"), (1, "unreadable"), (2, "unreadable")]
    assert rows[0]["best_value"] == 0.5


def test_an_unknown_status_is_not_written(tmp_path):
    with pytest.raises(ValueError, match="finished-ish"):  # "pruned" is a status again (a sweep's pruner)
        RunDir(tmp_path).write_summary(RunSummary(status="finished-ish"))
    assert not (tmp_path / "summary.json").exists()


# --- command lines ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/runs/plain", "/runs/it's", "/runs/back\\slash", "/runs/end\\", "/runs/a\\'b",
                                  "/runs/x=1,y=[2]"])
def test_quoted_paths_read_back_as_themselves_in_hydra(path):
    override = OverridesParser.create().parse_override(f"hydra.run.dir={quoted(path)}")
    assert override.value() == path


@pytest.mark.parametrize(("typed", "as_written"), [
    ("logger.mlflow.tracking_uri=http://127.0.0.1:5000", "logger.mlflow.tracking_uri=http://127.0.0.1:5000"),
    ("+dataset.path=/data/a:b/t.csv", "+dataset.path=/data/a:b/t.csv"),
    ("x=a b", "x=a b"),
    ("x='1:2'", "x='1:2'"),
    ("x=[a:b,c]", "x=[a\\:b,c]"),  # a list: as Hydra writes it
])
def test_a_grid_sweeps_override_reaches_its_job_as_typed(typed, as_written):
    """Hydra's grid sweeper escapes ':' and spaces in a string value; the job gets the value as typed."""
    parser = OverridesParser.create()
    [[written]] = BasicSweeper.split_arguments(parser.parse_overrides([typed]), None)[0]
    assert as_typed(written) == as_written
    assert parser.parse_override(as_typed(written)).value() == parser.parse_override(typed).value()


HYDRA_SETTINGS = ["hydra.searchpath=[file:///my/conf]", "hydra.mode=MULTIRUN", "hydra/launcher=dlrun",
                  "hydra.launcher.n_jobs=2", "+hydra.sweeper.params={a:1}", "hydra/sweeper=optuna",
                  "hydra.sweep.dir=/x", "hydra.run.dir=/y", "hydra.job.chdir=false"]


def test_a_job_and_a_rank_drop_the_same_sweep_settings(tmp_path):
    sweep_hydra = OmegaConf.create({
        "runtime": {"config_sources": [{"provider": "main", "path": "pkg://dlrun.conf"},
                                       {"provider": "command-line", "path": "file:///my/dir"}]},
        "job": {"config_name": "config"},
        "overrides": {"hydra": HYDRA_SETTINGS, "task": ["model=cnn"]},
    })
    job = job_command(sweep_hydra, tmp_path / "3_model=cnn", 3, ["model=cnn"])
    assert job[:7] == [sys.executable, "-m", "dlrun.cli", "--config-dir", "/my/dir", "--config-name", "config"]
    assert job[7:] == ["hydra.searchpath=[file:///my/conf]", "hydra.job.chdir=false", "model=cnn",
                       f"hydra.run.dir={quoted(tmp_path / '3_model=cnn')}", "hydra.job.num=3"]
    rank = rank_command(["/venv/bin/dlrun", "-m", "--config-name", "config", "model=mlp,cnn"], sweep_hydra)
    # a rank keeps the run directory it was given (Lightning appends its own after it)
    assert rank[2:5] == ["hydra.searchpath=[file:///my/conf]", "hydra.run.dir=/y", "hydra.job.chdir=false"]
    kept = {o for o in HYDRA_SETTINGS if not o.lstrip("+").startswith(SWEEP_ONLY)}
    assert kept == {"hydra.searchpath=[file:///my/conf]", "hydra.run.dir=/y", "hydra.job.chdir=false"}


# --- the error boundary -----------------------------------------------------------------------------
def test_the_launcher_and_the_summary_tool_import_neither_the_cli_nor_torch():
    code = ("import sys; import hydra_plugins.dlrun_launcher.dlrun_launcher, dlrun.sweep.summary, dlrun.command_line;"
            "print(sorted(m for m in ('torch', 'dlrun.cli') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
@pytest.mark.parametrize("full_error", ["1", None])
def test_a_sweep_job_shows_a_traceback_only_when_the_user_asked(full_error, tmp_path):
    """dlrun sets HYDRA_FULL_ERROR=1 for itself; the job gets the user's own setting."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if full_error:
        env["HYDRA_FULL_ERROR"] = full_error
    env["DLRUN_OUTPUT_DIR"] = str(tmp_path)
    # swept, so that each job (not the sweep's own check of the shared values) refuses it
    proc = subprocess.run([sys.executable, "-m", "dlrun.cli", "-m", "optim.lr=-1,-2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    (log,) = tmp_path.glob("sweeps/*/0_*/job.log")
    text = log.read_text()
    assert "optim.lr = -1" in text
    assert ("Traceback" in text) == bool(full_error)
