"""The sweep's fork server (dlrun/sweep/fork_server.py): forked jobs are processes of their own that compute what a
fresh `python -m dlrun.cli` computes, end as it ends, and are stopped as it is stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlrun.sweep.fork_server import ForkServer
from dlrun.sweep.launcher import Job, run_jobs

QUIET = ["print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false"]
FAST = ["debug=fast", "dataset.n_train=300"]
RESULTS = ("metrics", "best_value", "best_epoch", "epochs", "global_step")


def _job(num: int, job_dir: Path, *overrides: str) -> Job:
    command = [sys.executable, "-m", "dlrun.cli", *QUIET, *overrides, f"hydra.run.dir={job_dir}"]
    return Job(num, list(overrides), job_dir, command, forkable=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ForkServer:
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = ForkServer({**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=log)
    assert server.ready(wait=True), (server.reason, log.read_text())
    yield server
    server.close()


def test_a_server_closed_while_warming_up_is_stopped_not_waited_for(tmp_path):
    """Closed during its imports (a resumed sweep with nothing left to run), it has started no job: stopped."""
    server = ForkServer({**os.environ}, stderr=tmp_path / "server.log")
    server.close()
    assert server._process.returncode == -signal.SIGTERM and not server.ready()


@pytest.mark.slow
def test_a_forked_job_is_a_fresh_runs_equal(server, tmp_path):
    """Forked or started fresh, a job trains the same numbers; the forked one is its own session, not the server."""
    forked, fresh = _job(0, tmp_path / "forked", *FAST), _job(1, tmp_path / "fresh", *FAST)
    fresh.forkable = False
    results = run_jobs([forked, fresh], n_jobs=2, fork_server=server)
    assert [results[n].sweep_job["forked"] for n in (0, 1)] == [True, False]
    assert [results[n].status for n in (0, 1)] == ["completed", "completed"]
    for key in RESULTS:
        assert results[0].to_json()[key] == results[1].to_json()[key], key
    assert results[0].to_json()["epochs"] == 1
    assert (tmp_path / "forked" / "metrics.csv").read_text() == (tmp_path / "fresh" / "metrics.csv").read_text()
    # the job's output went to its log, not to the server's channel to the launcher
    assert "dlrun · completed" in (tmp_path / "forked" / "job.log").read_text()


def test_a_forked_command_prints_what_a_fresh_one_prints(server, tmp_path):
    """What the tests fork (run_process in tests/conftest.py): any of dlrun's commands, in a directory of its own
    (whose modules it imports, as `python -m` does), with stdout and stderr apart; the exit code, stdout and
    stderr are a fresh process's."""
    env = {**os.environ, "COLUMNS": "90"}
    (tmp_path / "own_module.py").write_text("X = 1\n")  # found: the class is missing, not the module
    for case, (module, argv, named) in enumerate((("dlrun.cli", [*QUIET, "optim.lr=-1"], "optim.lr = -1"),
                                                  ("dlrun.cli", [*QUIET, "model._target_=own_module.Missing"],
                                                   "not a package"),
                                                  ("dlrun.info", ["model=nope"], "nope"),
                                                  ("dlrun.evaluate", ["no_such_run"], "no_such_run"))):
        fresh = subprocess.run([sys.executable, "-m", module, *argv], env=env, cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)
        flat = "".join((fresh.stdout + fresh.stderr).replace("│", "").split())  # a panel wraps its lines
        assert fresh.returncode == 2 and "".join(named.split()) in flat, (module, fresh.stdout, fresh.stderr)
        stdout, stderr = tmp_path / f"{case}.out", tmp_path / f"{case}.err"
        job = server.start(argv, env, stdout, cwd=tmp_path, stderr=stderr, module=module)
        assert job.wait() == 2, module
        assert (stdout.read_text(), stderr.read_text()) == (fresh.stdout, fresh.stderr), module


@pytest.mark.slow
def test_forked_jobs_crash_alone_get_their_environment_and_obey_timeouts(server, tmp_path):
    job = server.start([*QUIET, *FAST, "trainer.max_epochs=100000", "callbacks=no_early_stopping",
                        f"hydra.run.dir={tmp_path / 'killed'}"], {**os.environ}, tmp_path / "killed.log")
    assert os.getsid(job.pid) == job.pid and job.pid != server._process.pid  # a session of its own
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "metrics.csv").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    assert job.wait() == -signal.SIGKILL

    # the server lives on; a job's environment is its own (DLRUN_OUTPUT_DIR places a run without hydra.run.dir);
    # a bad config ends with the CLI's exit code 2 and its panel in the job's log
    env = {**os.environ, "DLRUN_OUTPUT_DIR": str(tmp_path / "own_output")}
    bad = server.start([*QUIET, "optim.lr=-1"], env, tmp_path / "bad.log")
    good = server.start([*QUIET, *FAST], env, tmp_path / "good.log")
    assert bad.wait() == 2 and "optim.lr = -1" in (tmp_path / "bad.log").read_text()
    assert good.wait() == 0 and list((tmp_path / "own_output" / "runs").glob("*/*/summary.json"))

    # the launcher's timeout stops a forked job through its process group, as it stops a fresh one
    slow = _job(0, tmp_path / "slow", *FAST, "trainer.max_epochs=100000", "callbacks=no_early_stopping")
    result = run_jobs([slow], timeout=5, fork_server=server)[0]
    assert result.sweep_job["forked"] and result.status == "failed" and result.error.startswith("timed out")
    assert json.loads((tmp_path / "slow" / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_sweep_forks_its_cpu_jobs_unless_told_not_to(run_dlrun):
    forked = run_dlrun("-m", "seed=0,1", *QUIET, *FAST)
    run_dlrun("-m", "seed=0", *QUIET, *FAST, "hydra.launcher.fork_server=false")  # fresh: one job will do
    first, second = sorted((forked.output_dir / "sweeps").iterdir())
    jobs = {d: sorted((json.loads(p.read_text()) for p in d.glob("*/summary.json")), key=lambda s: s["seed"])
            for d in (first, second)}
    assert [j["sweep_job"]["forked"] for j in jobs[first]] == [True, True]
    assert [j["sweep_job"]["forked"] for j in jobs[second]] == [False]
    assert {k: jobs[first][0][k] for k in RESULTS} == {k: jobs[second][0][k] for k in RESULTS}  # seed 0 alike
