"""logger=mlflow against a real MLflow tracking server on loopback, read back with MLflow's own client."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from dlrun.tracking import _flatten  # noqa: E402

QUIET = ("print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite backend and a local artifact store; its URI; stopped at teardown."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli) if mlflow_cli.exists() else shutil.which("mlflow"), "server",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts")]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # the first start creates the database (slow on a busy machine)
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.2)
    yield uri
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def _runs(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([found.experiment_id])


@pytest.mark.slow
def test_a_run_logs_config_epochs_summary_and_best_checkpoint(mlflow_server, run_dlrun):
    result = run_dlrun(*QUIET, "logger=[csv,mlflow]", f"logger.mlflow.tracking_uri={mlflow_server}",
                       "logger.mlflow.experiment_name=single", "logger.mlflow.log_model=true",
                       "debug=fast", "trainer.max_epochs=3", "optim.lr=0.002")
    summary = result.summary()
    client = MlflowClient(mlflow_server)
    (run,) = _runs(client, "single")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim.lr"] == "0.002" and params["model._target_"] == "dlrun.models.mlp.MLP"
    assert params["dataset.batch_size"] == "64" and params["seed"] == "0"

    with (result.run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    for name in ("val/loss", "train/loss", "val/acc", "lr"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [0, 1, 2], name
        assert [m.value for m in history] == pytest.approx([float(r[name]) for r in rows], rel=1e-6), name

    assert run.data.tags["dlrun.status"] == "completed"
    assert run.data.tags["dlrun.run_dir"] == str(result.run_dir)
    assert run.data.tags["mlflow.runName"] == ",".join([*QUIET, "debug=fast", "trainer.max_epochs=3", "optim.lr=0.002"])
    assert run.data.metrics["best_value"] == pytest.approx(summary["best_value"])
    assert run.data.metrics["wall_seconds"] == pytest.approx(summary["wall_seconds"])
    assert run.data.metrics["test/acc"] == pytest.approx(summary["metrics"]["test/acc"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]


@pytest.mark.slow
def test_sweep_jobs_share_the_sweeps_name(mlflow_server, run_dlrun):
    # the server from the environment (MLFLOW_TRACKING_URI), as a shared server is usually given
    result = run_dlrun("-m", *QUIET, "logger=mlflow", "logger.mlflow.experiment_name=sweep", "debug=fast", "seed=0,1",
                       env={"MLFLOW_TRACKING_URI": mlflow_server})
    (sweep_dir,) = (result.output_dir / "sweeps").iterdir()
    runs = _runs(MlflowClient(mlflow_server), "sweep")
    assert sorted(r.data.tags["mlflow.runName"].split(",")[-1] for r in runs) == ["seed=0", "seed=1"]
    assert {r.data.tags.get("sweep") for r in runs} == {sweep_dir.name}
    assert {r.data.tags["dlrun.status"] for r in runs} == {"completed"}
    for run in runs:  # each job's summary
        job_summary = json.loads((Path(run.data.tags["dlrun.run_dir"]) / "summary.json").read_text())
        assert run.data.metrics["best_value"] == pytest.approx(job_summary["best_value"])
        assert run.data.params["seed"] == str(job_summary["seed"])


@pytest.mark.slow
def test_an_unreachable_server_costs_a_warning_not_the_run(run_dlrun):
    result = run_dlrun(*QUIET, "logger=[csv,mlflow]", f"logger.mlflow.tracking_uri=http://127.0.0.1:{_free_port()}",
                       "debug=fast")
    assert result.summary()["status"] == "completed"
    assert (result.run_dir / "metrics.csv").is_file()
    output = result.stdout + result.stderr
    assert "MLflow failed" in output and "training goes on without MLflow" in output
    assert "Traceback" not in output


def test_config_flattens_to_the_names_overrides_use():
    assert _flatten({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "seed": 0, "regularizer": {}}) == {
        "optim.lr": 0.1, "optim.betas": [0.9, 0.99], "seed": 0, "regularizer": {}}
