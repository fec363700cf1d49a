"""`sweep.resume=<sweep dir>`: interrupted jobs continue from their last checkpoint, failed jobs run again up to
hydra.launcher.retries, finished jobs are left alone, another command is refused (dlrun/sweep/resume.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import DLRUN

QUIET = ("print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false")
FAST = ("debug=fast", "dataset.n_train=300")


def _files(job_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a job directory: (modification time, contents), to show that nothing touched it."""
    return {str(p.relative_to(job_dir)): (p.stat().st_mtime_ns, p.read_bytes()) for p in job_dir.rglob("*") if p.is_file()}


def _summary(job_dir: Path) -> dict:
    return json.loads((job_dir / "summary.json").read_text())


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_its_jobs_where_they_stopped(run_dlrun, tmp_path):
    # two identical jobs (the same seed): job 0 runs to its end and is the reference for job 1, which the
    # sweep's SIGTERM interrupts in its third epoch
    args = ["-m", "seed=0,0", *QUIET, *FAST, "trainer.max_epochs=20", "callbacks=no_early_stopping"]
    env = {**os.environ, "DLRUN_OUTPUT_DIR": str(tmp_path / "outputs")}
    env.pop("HYDRA_FULL_ERROR", None)
    sweep = subprocess.Popen([*DLRUN, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 600
    while time.time() < deadline and sweep.poll() is None:
        metrics = list((tmp_path / "outputs").glob("sweeps/*/1_*/metrics.csv"))
        if metrics and len(metrics[0].read_text().splitlines()) >= 3:  # header and two epochs
            break
        time.sleep(0.02)
    sweep.send_signal(signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 128 + signal.SIGTERM, stderr
    (sweep_dir,) = (tmp_path / "outputs" / "sweeps").iterdir()
    reference, job_dir = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert "sweep.resume=" in stderr.replace("\n", "") and "Traceback" not in stderr
    stopped = _summary(job_dir)  # the launcher stopped the job cleanly: it saved its last checkpoint
    assert stopped["status"] == "interrupted" and 2 <= stopped["epochs"] < 20
    untouched = _files(reference)

    resumed = run_dlrun(*args, f"sweep.resume={sweep_dir}")
    assert " ".join(resumed.stdout.split()).count("completed earlier, skipped") == 1
    assert _files(reference) == untouched
    final, alone = _summary(job_dir), _summary(reference)
    (continued,) = final["resumed"]  # from its last checkpoint, not from epoch 0
    assert final["status"] == "completed" and 1 <= continued["epoch"] <= stopped["epochs"]
    assert f"resume='{job_dir}'" in final["sweep_job"]["command"]
    for key in ("metrics", "last_epoch", "best_value", "best_epoch", "epochs", "global_step"):
        assert final[key] == alone[key], key
    assert (job_dir / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()
    log = (job_dir / "job.log").read_text()  # one log for both sessions of the job
    assert log.count("resuming from") == 1 and log.index("interrupted (signal 15)") < log.index("resuming from")
    assert not (sweep_dir / ".attempts").exists()
    document = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert document["counts"] == {"completed": 2}


@pytest.mark.slow
def test_resume_retries_failed_jobs_up_to_retries_and_refuses_another_command(run_dlrun):
    args = ["-m", "optim.lr=0.05,-1", *QUIET, *FAST]
    first = run_dlrun(*args, check=False)
    assert first.returncode == 1
    (sweep_dir,) = (first.output_dir / "sweeps").iterdir()
    good, bad = (next(sweep_dir.glob(f"{n}_*")) for n in (0, 1))  # optim.lr=0.05, optim.lr=-1
    assert _summary(good)["status"] == "completed" and _summary(bad)["status"] == "failed"
    untouched = _files(good)
    attempts = sweep_dir / ".attempts"

    # retries=1 (the default): the failed job runs once more; its first attempt is kept aside
    again = run_dlrun(*args, f"sweep.resume={sweep_dir}", check=False)
    shown = " ".join(again.stdout.split())  # the report's lines, wherever the terminal wrapped them
    assert again.returncode == 1 and "completed earlier, skipped" in shown and "job 1" in shown
    assert sorted(p.name for p in attempts.iterdir()) == [f"{bad.name}.1"]
    assert _summary(bad)["status"] == "failed"
    assert _summary(bad)["sweep_job"]["process_started_at"] > _summary(attempts / f"{bad.name}.1")["finished_at"]
    # it has failed twice now: not again, unless more retries are allowed
    third = run_dlrun(*args, f"sweep.resume={sweep_dir}", check=False)
    assert third.returncode == 1
    assert "failed 2 times, not retried (hydra.launcher.retries=1)" in " ".join(third.stdout.split())
    assert sorted(p.name for p in attempts.iterdir()) == [f"{bad.name}.1"]
    more = run_dlrun(*args, f"sweep.resume={sweep_dir}", "hydra.launcher.retries=2", "hydra.launcher.n_jobs=2",
                     check=False)  # launcher settings are not the sweep's command: they may change
    assert more.returncode == 1
    assert sorted(p.name for p in attempts.iterdir()) == [f"{bad.name}.1", f"{bad.name}.2"]
    assert _files(good) == untouched

    # another search space is another sweep: refused before any job, with the difference shown
    before = sorted(str(p) for p in sweep_dir.rglob("*"))
    changed = run_dlrun("-m", "optim.lr=0.05,-2", *QUIET, *FAST, f"sweep.resume={sweep_dir}", check=False)
    assert changed.returncode == 2, changed.stdout + changed.stderr
    shown = changed.stdout + changed.stderr
    assert "Not the same sweep" in shown and "Traceback" not in shown
    assert "-optim.lr=0.05,-1" in shown and "+optim.lr=0.05,-2" in shown
    assert sorted(str(p) for p in sweep_dir.rglob("*")) == before and _files(good) == untouched


def test_each_earlier_attempt_has_its_way_to_go_on(tmp_path):
    from dlrun.run_summary import RunSummary
    from dlrun.rundir import RunDir
    from dlrun.sweep.resume import earlier_attempt, set_aside

    def job(name: str, status: str | None, checkpoint: bool = False) -> Path:
        run_dir = RunDir(tmp_path / name)
        run_dir.path.mkdir(exist_ok=True)
        if status is not None:
            run_dir.write_summary(RunSummary(status=status))
        if checkpoint:
            run_dir.checkpoint_dir.mkdir()
            run_dir.checkpoint("last").write_bytes(b"")
            run_dir.config_file.write_text("seed: 0\n")
        return run_dir.path

    actions = {status: earlier_attempt(job(f"{status}", status), retries=1).action
               for status in ("completed", "diverged", "interrupted")}
    assert actions == {"completed": "skip", "diverged": "skip", "interrupted": "start"}  # no checkpoint: afresh
    assert earlier_attempt(job("stopped", "interrupted", checkpoint=True), retries=1).action == "continue"
    assert earlier_attempt(job("killed", None, checkpoint=True), retries=1).action == "continue"
    assert earlier_attempt(tmp_path / "never_started", retries=1).action == "start"
    assert not (tmp_path / "never_started").exists()
    failed = job("failed", "failed")
    assert earlier_attempt(failed, retries=0).action == "give_up"
    assert (earlier_attempt(failed, retries=1).action, earlier_attempt(failed, retries=1).failures) == ("retry", 1)
    set_aside(failed)
    job("failed", "failed")  # the retry failed too
    assert (earlier_attempt(failed, retries=1).action, earlier_attempt(failed, retries=1).failures) == ("give_up", 2)
    assert earlier_attempt(failed, retries=2).action == "retry"
    assert (tmp_path / ".attempts" / "failed.1" / "summary.json").exists()


def test_the_sweeps_command_is_recorded_and_a_different_one_refused(tmp_path):
    from dlrun.sweep.resume import SWEEP_COMMAND, SweepChanged, check_sweep_command

    command = ["--config-name=config", "model=mlp,cnn", "optim.lr=0.1"]
    check_sweep_command(tmp_path, command, resuming=False)
    assert (tmp_path / SWEEP_COMMAND).is_file()
    check_sweep_command(tmp_path, command, resuming=True)  # the same: accepted
    with pytest.raises(SweepChanged) as refused:
        check_sweep_command(tmp_path, ["--config-name=config", "model=mlp,cnn", "optim.lr=0.2"], resuming=True)
    assert refused.value.message.splitlines()[1:] == ["-optim.lr=0.1", "+optim.lr=0.2"]
    check_sweep_command(tmp_path, command, resuming=True)  # the record is still the first command's
