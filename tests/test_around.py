"""Around a run: learning-curve pictures, model export, the learning-rate range test, the profiler preset."""

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

    default = subprocess.run([*DLRUN, *QUIET], env=_env(tmp_path / "default"), capture_output=True, text=True,
                             timeout=900)
    assert default.returncode == 0, default.stderr
    completed = _only_run_dir(tmp_path / "default")

    diverging = subprocess.run([*DLRUN, *QUIET, "optim=sgd", "optim.lr=1e4", "debug=fast"],
                               env=_env(tmp_path / "diverged"), capture_output=True, text=True, timeout=600)
    assert diverging.returncode == 0, diverging.stderr
    diverged = _only_run_dir(tmp_path / "diverged")

    out = tmp_path / "interrupted"
    proc = subprocess.Popen([*DLRUN, *QUIET, "dataset.n_train=300", "callbacks=no_early_stopping",
                             "trainer.max_epochs=200"], env=_env(out), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # two epochs logged
        rows = list(out.glob("runs/*/*/metrics.csv"))
        if rows and len(rows[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    interrupted = _only_run_dir(out)

    for run_dir, status in ((completed, "completed"), (diverged, "diverged"), (interrupted, "interrupted")):
        assert _summary(run_dir)["status"] == status
        assert (run_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC, status

    # drawing costs a few percent of a default run at most: the same drawing, timed on the same machine
    before = (completed / "curves.png").read_bytes()
    started = time.perf_counter()
    write_curves(completed)
    drawing = time.perf_counter() - started
    assert (completed / "curves.png").read_bytes()[:8] == PNG_MAGIC and len(before) > 10_000
    assert drawing < 0.05 * _summary(completed)["wall_seconds"], (drawing, _summary(completed)["wall_seconds"])


def test_curves_mark_the_best_epoch_and_how_the_run_stopped():
    from dlrun.curves import main_score, stop_note

    assert main_score({"epoch": [], "val/r2": [], "val/loss": []}) == "r2"
    assert main_score({"epoch": [], "train/bpc": [], "val/f1": []}) == "bpc"
    assert main_score({"epoch": [], "val/loss": []}) is None
    assert stop_note({"status": "completed"}, max_epochs=50, last_epoch=30) == ("early stop", 30)
    assert stop_note({"status": "completed"}, max_epochs=50, last_epoch=49) is None
    assert stop_note({"status": "diverged", "diverged": {"epoch": 3}}, 50, last_epoch=2) == ("diverged", 3)
    assert stop_note({"status": "interrupted"}, 50, last_epoch=4) == ("interrupted", 4)
