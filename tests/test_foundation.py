"""The foundation: composition, validation, the default experiment end to end, the run directory."""

from __future__ import annotations

import csv
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from dlrun.config import find_problems
from dlrun.docs import group_options
from dlrun.docs import main as docs_main

# Groups whose options replace the whole experiment or the launcher: composed, but not trained here.
ALL_OPTIONS = [(group, option) for group, options in group_options().items() for option, _, _ in options]


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_group_option_composes_and_validates(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}")
    assert find_problems(cfg) == []


def test_regularizers_compose_as_a_list(compose_cfg):
    cfg = compose_cfg("regularizer=[l2,dropout]", "regularizer.l2.alpha=0.001")
    assert set(cfg.regularizer) == {"l2", "dropout"}
    assert cfg.regularizer.l2.alpha == 0.001


def test_readme_config_table_matches_conf():
    assert docs_main(["--check"]) == 0, "README.md's config table is stale: run `python -m dlrun.docs`"


def test_default_experiment_end_to_end(run_dlrun):
    """`dlrun` with no arguments: digits + MLP + Adam + early stopping, test accuracy above 0.9."""
    result = run_dlrun()
    run_dir = result.run_dir
    summary = result.summary()
    assert summary["status"] == "completed"
    assert summary["metrics"]["test/acc"] > 0.9
    assert "run directory" in result.stdout and "test/acc" in result.stdout

    # metrics.csv: one row per epoch, and the summary's best value/epoch are its val/loss minimum
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert len(rows) == summary["epochs"]
    assert [int(r["epoch"]) for r in rows] == list(range(len(rows)))
    val_losses = [float(r["val/loss"]) for r in rows]
    best_epoch = min(range(len(rows)), key=val_losses.__getitem__)
    assert summary["best_epoch"] == best_epoch
    assert summary["best_value"] == pytest.approx(val_losses[best_epoch], rel=1e-6)
    assert float(rows[-1]["train/loss"]) < float(rows[0]["train/loss"]) / 5
    # early stopping (patience 5) stopped it before max_epochs
    assert summary["epochs"] < 50 and summary["epochs"] - 1 - best_epoch == 5

    # the run directory contract
    assert summary["params"] == (64 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10)
    assert summary["seed"] == 0 and summary["overrides"] == []
    assert summary["monitor"] == "val/loss" and summary["wall_seconds"] > 0
    for name in ("config.yaml", "overrides.yaml", "dlrun.log", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    resolved = (run_dir / "config.yaml").read_text()
    assert "${" not in resolved and yaml.safe_load(resolved)["model"]["width"] == 128
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["epoch"] == best_epoch


def test_same_seed_same_metrics(run_dlrun):
    args = ("trainer.max_epochs=3", "print_config=false", "callbacks.model_summary=false")
    first = run_dlrun(*args, "seed=7")
    second = run_dlrun(*args, "seed=7")
    third = run_dlrun(*args, "seed=8")
    a, b, c = (r.summary(d) for r, d in zip((first, second, third), first.run_dirs, strict=True))
    assert a["metrics"] == b["metrics"]
    assert a["metrics"] != c["metrics"]


def test_lstm_reads_digits_row_by_row(run_dlrun):
    result = run_dlrun("model=lstm", "trainer.max_epochs=4", "print_config=false")
    summary = result.summary()
    assert summary["status"] == "completed"
    assert summary["metrics"]["test/acc"] > 0.5  # chance is 0.1


def test_overfit_preset_fits_one_batch(run_dlrun):
    summary = run_dlrun("debug=overfit", "print_config=false").summary()
    assert summary["metrics"]["train/acc"] == 1.0
    assert summary["metrics"]["train/loss"] < 0.01


def test_debug_fast_runs_few_batches(run_dlrun):
    summary = run_dlrun("debug=fast", "model=cnn", "regularizer=[l2,dropout]").summary()
    assert summary["status"] == "completed"
    assert summary["epochs"] == 1 and summary["global_step"] == 3


def test_cfg_job_prints_config_and_trains_nothing(run_dlrun):
    result = run_dlrun("--cfg", "job", "model=lstm")
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"]["_target_"].endswith("LSTM")
    assert not result.run_dirs


def test_help_lists_groups_and_options(run_dlrun):
    out = run_dlrun("--help").stdout
    for word in ("model", "mlp", "lstm", "optim", "adam", "regularizer", "dataset", "digits"):
        assert word in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=foo"], ["model/foo", "mlp", "lstm", "cnn"]),
        (["optim.lr=-0.1"], ["optim.lr", "> 0"]),
        (["model.dropout=1.0"], ["model.dropout", "[0, 1)"]),
        (["regularizer=augment", "regularizer.augment.brightness=2"],
         ["regularizer.augment.brightness", "[0, 1]"]),
        (["dataset.batch_size=0"], ["dataset.batch_size", ">= 1"]),
        (["trainer.max_epochs=0"], ["trainer.max_epochs", ">= 1"]),
        (["optim.lr=fast"], ["optim.lr", "'fast'"]),
        (["model=resnet", "dataset=adding"], ["resnet", "adding", "sequence", "(20, 2)"]),
        (["callbacks.monitor=val/accuracy"], ["val/accuracy", "val/acc", "val/loss"]),
        (["dataset=sine", "callbacks.monitor=val/acc"], ["val/acc", "regression", "val/r2"]),
        (["callbacks.monitor=train/f1"], ["train/f1", "val/f1"]),  # evaluation-only metrics: never train/
    ],
)
def test_bad_input_exits_2_with_a_panel(run_dlrun, args, expected):
    result = run_dlrun(*args, check=False)
    assert result.returncode == 2, result.stderr
    text = " ".join((result.stdout + result.stderr).split())
    for fragment in expected:
        assert fragment in text
    assert "Traceback" not in result.stderr
    assert not (result.output_dir / "runs").exists() or all(
        not (d / "summary.json").exists() for d in result.run_dirs
    )


def test_config_errors_do_not_import_torch(tmp_path):
    code = (
        "import sys, atexit; atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules));"
        "sys.argv = ['dlrun', 'optim.lr=-1']; from dlrun.cli import main; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "torch loaded: False" in proc.stdout


@pytest.mark.parametrize("overrides", [[], ["experiment=lstm_digits"], ["sweep=tpe"],
                                       ["hydra.mode=MULTIRUN"], ["hydra.mode=RUN", "debug=fast"]])
def test_run_mode_read_off_the_command_line_is_hydras(overrides):
    """dlrun skips the composition Hydra makes only to read hydra.mode: no config of dlrun's may set it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dlrun import CONF_DIR
    from dlrun.cli import mode_from_command_line

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose("config", overrides=overrides, return_hydra_config=True).hydra.mode
    assert mode_from_command_line(None, "config", overrides) == composed


def test_user_config_dir_through_search_path(run_dlrun, tmp_path):
    conf = tmp_path / "my_conf" / "model"
    conf.mkdir(parents=True)
    (conf / "tiny.yaml").write_text("# my own tiny MLP\n_target_: dlrun.models.mlp.MLP\nwidth: 8\ndepth: 1\n")
    result = run_dlrun(f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "model=tiny", "debug=fast")
    summary = result.summary()
    assert summary["status"] == "completed"
    assert summary["params"] == (64 * 8 + 8) + (8 * 10 + 10)


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("dlrun-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"dlrun/conf/{p.relative_to(root / 'conf')}" for p in (root / "conf").rglob("*.yaml")}
    assert shipped and shipped <= names
    modules = {str(p.relative_to(root)) for pattern in ("dlrun/**/*.py", "hydra_plugins/**/*.py") for p in root.glob(pattern)}
    assert modules <= names, f"modules missing from the wheel (pyproject.toml's packages): {modules - names}"
    assert "dlrun/conf/__init__.py" in names
