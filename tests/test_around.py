"""Around a run: learning-curve pictures, model export, the learning-rate range test, the profiler preset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import DLRUN, run_process, sigterm_after_two_epochs

QUIET = ("print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env(output_dir: Path) -> dict[str, str]:
    env = {**os.environ, "DLRUN_OUTPUT_DIR": str(output_dir), "COLUMNS": "200"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _only_run_dir(output_dir: Path) -> Path:
    (run_dir,) = [p.parent for p in (output_dir / "runs").glob("*/*/config.yaml")]
    return run_dir


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# --- curves.png -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_curves_png_for_completed_diverged_and_interrupted_runs_and_cheap(tmp_path):
    from dlrun.curves import write_curves

    started = time.perf_counter()
    default = subprocess.run([*DLRUN, *QUIET], env=_env(tmp_path / "default"), capture_output=True, text=True,
                             timeout=900)
    run_seconds = time.perf_counter() - started  # the default run as its user waits for it, start to end
    assert default.returncode == 0, default.stderr
    completed = _only_run_dir(tmp_path / "default")

    diverging = run_process([*DLRUN, *QUIET, "optim=sgd", "optim.lr=1e4", "debug=fast"],
                            env=_env(tmp_path / "diverged"), timeout=600)
    assert diverging.returncode == 0, diverging.stderr
    diverged = _only_run_dir(tmp_path / "diverged")

    out = tmp_path / "interrupted"
    code, _, stderr = sigterm_after_two_epochs([*DLRUN, *QUIET, "dataset.n_train=300", "callbacks=no_early_stopping",
                                                "trainer.max_epochs=200"], _env(out), out)
    assert code == 128 + signal.SIGTERM, stderr
    interrupted = _only_run_dir(out)

    for run_dir, status in ((completed, "completed"), (diverged, "diverged"), (interrupted, "interrupted")):
        assert _summary(run_dir)["status"] == status
        assert (run_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC, status

    # drawing costs a few percent of a default run at most: the same drawing, timed on the same machine. A run
    # has matplotlib imported already (Lightning imports it), so the drawing alone is what it adds.
    import matplotlib.figure  # noqa: F401

    before = (completed / "curves.png").read_bytes()
    started = time.perf_counter()
    write_curves(completed)
    drawing = time.perf_counter() - started
    assert (completed / "curves.png").read_bytes()[:8] == PNG_MAGIC and len(before) > 10_000
    assert drawing < 0.05 * run_seconds, (drawing, run_seconds)


def test_curves_mark_the_best_epoch_and_how_the_run_stopped():
    from dlrun.curves import main_score, stop_note

    assert main_score({"epoch": [], "val/r2": [], "val/loss": []}) == "r2"
    assert main_score({"epoch": [], "train/bpc": [], "val/f1": []}) == "bpc"
    assert main_score({"epoch": [], "val/loss": []}) is None
    assert stop_note({"status": "completed"}, max_epochs=50, last_epoch=30) == ("early stop", 30)
    assert stop_note({"status": "completed"}, max_epochs=50, last_epoch=49) is None
    assert stop_note({"status": "diverged", "diverged": {"epoch": 3}}, 50, last_epoch=2) == ("diverged", 3)
    assert stop_note({"status": "interrupted"}, 50, last_epoch=4) == ("interrupted", 4)


# --- dlrun-export ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory) -> dict[str, Path]:
    """An MLP, a CNN and an LSTM trained briefly on digits: {model: run dir}."""
    out = tmp_path_factory.mktemp("export_runs")
    sweep = run_process([*DLRUN, "-m", *QUIET, "model=mlp,cnn,lstm", "debug=fast", "trainer.max_epochs=2",
                         "trainer.limit_test_batches=1.0"],
                        env=_env(out), timeout=1200)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    runs = {}
    for summary_file in out.glob("sweeps/*/*/summary.json"):
        runs[json.loads(summary_file.read_text())["choices"]["model"]] = summary_file.parent
    assert sorted(runs) == ["cnn", "lstm", "mlp"]
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "cnn", "lstm"])
def test_export_onnx_and_torchscript_compute_what_the_run_did(digits_runs, model, tmp_path):
    import numpy as np
    import onnxruntime
    import torch

    from dlrun.evaluate import _load, resolve

    run_dir = digits_runs[model]
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        proc = run_process([*DLRUN[:2], "dlrun.export", str(run_dir), "--format", fmt], env=_env(tmp_path),
                           timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "checked with" in proc.stdout and (run_dir / name).is_file()
        sidecar = json.loads((run_dir / f"{name}.json").read_text())
        assert sidecar["model"] == model and sidecar["task"] == "multiclass" and sidecar["input"]["shape"] == [
            "batch", 1, 8, 8]
        assert sidecar["class_names"] == [str(d) for d in range(10)]
        assert sidecar["verified"]["max_abs_diff"] <= 1e-4

    # independently of dlrun-export: the exported files classify the test split as the run's test metrics say
    rebuilt, checkpoint = resolve(run_dir)
    datamodule, module, _ = _load(rebuilt, checkpoint, rebuilt.read_config())
    x, y = (t.cpu() for t in datamodule.splits["test"])
    mean, std = datamodule.norm_stats
    normalize = json.loads((run_dir / "model.onnx.json").read_text())["preprocessing"]["normalize"]
    assert normalize["mean"] == pytest.approx(mean.flatten().tolist()) and normalize["shape"] == list(mean.shape)
    assert normalize["std"] == pytest.approx(std.flatten().tolist())
    session = onnxruntime.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"input": x.numpy()})[0]
    scripted_out = torch.jit.load(str(run_dir / "model.pt"))(x).detach().numpy()
    with torch.no_grad():
        reference = module.network.cpu().eval()(x).numpy()
    np.testing.assert_allclose(onnx_out, reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scripted_out, reference, rtol=1e-4, atol=1e-4)
    accuracy = float((onnx_out.argmax(1) == y.numpy()).mean())
    assert accuracy == pytest.approx(_summary(run_dir)["metrics"]["test/acc"], abs=1e-6)


def test_export_of_something_else_than_a_run_exits_2_with_a_panel(tmp_path):
    proc = run_process([*DLRUN[:2], "dlrun.export", str(tmp_path)], timeout=300)
    assert proc.returncode == 2
    assert "Not a run directory" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


# --- dlrun-lr-find --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_lr_range_test_suggests_a_sensible_rate(optim, tmp_path):
    proc = run_process([*DLRUN[:2], "dlrun.lr_find", f"optim={optim}", "--steps", "150"], env=_env(tmp_path),
                       timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (found,) = (tmp_path / "lr_find").iterdir()  # the test's directory is kept
    result = json.loads((found / "lr_find.json").read_text())
    assert 1e-4 <= result["suggested_lr"] <= 1
    assert f"optim.lr={result['suggested_lr']:.2g}" in proc.stdout.replace("\n", "")
    assert result["smoothed_loss_at_suggestion"] < result["initial_smoothed_loss"]
    assert (found / "lr_find.png").read_bytes()[:8] == PNG_MAGIC and (found / "config.yaml").is_file()
    rows = (found / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "step,lr,loss,smoothed_loss" and len(rows) - 1 == result["steps_taken"] > 10


def test_lr_range_test_refuses_bad_input_with_exit_2(tmp_path):
    for args in (["--min-lr", "1", "--max-lr", "0.1"], ["model=nope"]):
        proc = run_process([*DLRUN[:2], "dlrun.lr_find", *args], env=_env(tmp_path), timeout=300)
        assert proc.returncode == 2, args
        assert "Traceback" not in proc.stdout + proc.stderr


# --- debug=profile --------------------------------------------------------------------------------


@pytest.mark.slow
def test_debug_profile_prints_top_operators_and_writes_a_trace(tmp_path):
    # Every operator in the table: under load the ranking shifts, and a top-20 cut could drop any one of them.
    proc = run_process([*DLRUN, *QUIET, "debug=profile", "trainer.profiler.row_limit=1000"], env=_env(tmp_path),
                       timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "aten::addmm" in proc.stdout and "Self CPU" in proc.stdout  # the MLP's linear layers, in the table
    trace = json.loads((_only_run_dir(tmp_path) / "profile.pt.trace.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any(name.startswith("aten::") for name in names)
    assert any("training_step" in name for name in names)  # the recorded steps, one span each
