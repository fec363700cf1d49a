"""Nothing from outside runs code, and one error boundary (issue 17): real `dlrun`, `dlrun-eval` and
`dlrun-summary` processes on crafted files and directories; each checks its exit code, its panel, and that
the code a crafted file asked for did not run (the file it would have created does not exist)."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import DLRUN, run_process
from tests.test_data import _write_cifar

DLRUN_EVAL = [sys.executable, "-m", "dlrun.evaluate"]
DLRUN_SUMMARY = [sys.executable, "-m", "dlrun.sweep.summary"]
QUIET = ("print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false")
TRUST_LINE = "`weights_only` was not set"


def _run(command: list[str], out: Path, *args: str, env: dict[str, str] | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DLRUN_OUTPUT_DIR": str(out), "COLUMNS": "200"}
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.pop("DLRUN_TRUST_RUN_CONFIGS", None)
    full_env.update(env or {})
    return run_process([*command, *args], env=full_env, cwd=out.parent, timeout=timeout)


def _flat(proc: subprocess.CompletedProcess) -> str:
    """stdout + stderr without the panel's borders and line breaks (a panel may wrap a path)."""
    text = proc.stdout + proc.stderr
    return "".join(text.replace("│", "").split())


def _assert_refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output, output
    for word in words:
        assert "".join(word.split()) in _flat(proc), (word, output)


# --- CIFAR batches are read without running code --------------------------------------------------------


class _TouchOnLoad:
    """Unpickled, this object would create `path` (what a crafted batch could do with any code)."""

    def __init__(self, how: str, path: Path):
        self.how, self.path = how, path

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.path}",)
        return pathlib.Path.touch, (pathlib.Path(self.path),)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["os.system", "pathlib.Path.touch"])
def test_a_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path, how):
    _write_cifar(tmp_path / "data", np.random.default_rng(0))
    marker = tmp_path / "pwned"
    batch_file = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    batch = pickle.loads(batch_file.read_bytes())
    batch["labels"] = _TouchOnLoad(how, marker)
    batch_file.write_bytes(pickle.dumps(batch, protocol=2))
    proc = _run(DLRUN, tmp_path / "out", *QUIET, "debug=fast", "dataset=cifar10", "model=mlp",
                f"dataset.root={tmp_path / 'data'}", "dataset.download=false")
    _assert_refused(proc, str(batch_file), "could run code")
    assert not marker.exists()


@pytest.mark.slow
def test_a_genuine_cifar_batch_still_trains(tmp_path):
    _write_cifar(tmp_path / "data", np.random.default_rng(0))
    for path in (tmp_path / "data" / "cifar-10-batches-py").iterdir():  # Python 2's protocol, as shipped
        path.write_bytes(pickle.dumps(pickle.loads(path.read_bytes()), protocol=2))
    proc = _run(DLRUN, tmp_path / "out", *QUIET, "debug=fast", "dataset=cifar10", "model=mlp",
                f"dataset.root={tmp_path / 'data'}", "dataset.download=false")
    assert proc.returncode == 0, proc.stderr
    (summary,) = (tmp_path / "out" / "runs").glob("*/*/summary.json")
    assert json.loads(summary.read_text())["status"] == "completed"


# --- configs from run and sweep directories name only what dlrun's configs define -----------------------


def _copy_with(trained_run: Path, where: Path, status: str, edit) -> Path:
    shutil.copytree(trained_run, where)
    summary = json.loads((where / "summary.json").read_text())
    summary["status"] = status
    (where / "summary.json").write_text(json.dumps(summary))
    cfg = yaml.safe_load((where / "config.yaml").read_text())
    edit(cfg)
    (where / "config.yaml").write_text(yaml.safe_dump(cfg))
    return where


def _evil_regularizer(marker: Path):
    def edit(cfg: dict) -> None:
        cfg["regularizer"] = {"evil": {"_target_": "os.system", "_args_": [f"touch {marker}"]}}
    return edit


def _evil_dataset(marker: Path):
    def edit(cfg: dict) -> None:
        cfg["dataset"]["_target_"] = "shutil.copyfile"
        cfg["dataset"]["src"], cfg["dataset"]["dst"] = "/etc/hostname", str(marker)
    return edit


@pytest.mark.slow
@pytest.mark.parametrize("edit", [_evil_regularizer, _evil_dataset], ids=["os.system", "shutil.copyfile"])
@pytest.mark.parametrize("command", ["dlrun-eval", "resume"])
def test_a_run_directory_naming_foreign_code_is_refused(trained_run, tmp_path, edit, command):
    marker = tmp_path / "pwned"
    run_dir = _copy_with(trained_run, tmp_path / "run", "interrupted", edit(marker))
    if command == "dlrun-eval":
        proc = _run(DLRUN_EVAL, tmp_path / "out", str(run_dir))
    else:
        proc = _run(DLRUN, tmp_path / "out", f"resume={run_dir}")
    _assert_refused(proc, "Untrusted config", str(run_dir / "config.yaml"), "dlrun-eval --trust",
                    "DLRUN_TRUST_RUN_CONFIGS=1")
    assert not marker.exists()


@pytest.mark.slow
def test_replayed_overrides_may_not_set_hydras_settings(trained_run, tmp_path):
    """Hydra's logging config names classes too: an override recorded in a run directory may not set it."""
    run_dir = _copy_with(trained_run, tmp_path / "run", "interrupted", lambda cfg: None)
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    overrides.append("hydra.job_logging.handlers.file.class=os.system")
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    _assert_refused(_run(DLRUN, tmp_path / "out", f"resume={run_dir}"), "Untrusted config",
                    "hydra.job_logging.handlers.file.class")


def test_dlrun_configs_and_the_users_search_path_are_trusted(tmp_path, compose_cfg):
    from dlrun.trust import UntrustedConfig, check_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    check_config(compose_cfg("model=cnn", "regularizer=[l2,dropout]", "scheduler=cosine"), run_dir / "config.yaml")
    mine = tmp_path / "my_conf" / "model"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("_target_: my_models.Net\nwidth: 3\n")
    cfg = {"model": {"_target_": "my_models.Net"}, "dataset": {}}
    with pytest.raises(UntrustedConfig, match="model._target_ = my_models.Net"):
        check_config(cfg, run_dir / "config.yaml")
    (run_dir / ".hydra").mkdir()
    hydra_yaml = {"hydra": {"searchpath": [f"file://{tmp_path / 'my_conf'}"]}}
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_yaml))
    check_config(cfg, run_dir / "config.yaml")  # the user's configured search path defines it
    # ... but a search path inside the run directory cannot vouch for the directory
    shutil.copytree(tmp_path / "my_conf", run_dir / "conf")
    hydra_yaml["hydra"]["searchpath"] = [f"file://{run_dir / 'conf'}"]
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_yaml))
    with pytest.raises(UntrustedConfig):
        check_config(cfg, run_dir / "config.yaml")


@pytest.mark.slow
def test_sweep_resume_reads_only_the_jobs_summaries(tmp_path):
    """A resumed sweep composes its jobs from the command line and reads only each job's summary.json:
    configs planted in its directory (multirun.yaml, a job's config.yaml) are never built."""
    out = tmp_path / "out"
    args = (*QUIET, "debug=fast", "dataset=xor", "model=logreg")
    first = _run(DLRUN, out, "-m", *args, "seed=0")
    assert first.returncode == 0, first.stderr
    (sweep_dir,) = (out / "sweeps").iterdir()
    (job_dir,) = [p.parent for p in sweep_dir.glob("*/summary.json")]
    marker = tmp_path / "pwned"
    evil = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
    for path in (job_dir / "config.yaml", sweep_dir / "multirun.yaml"):
        cfg = yaml.safe_load(path.read_text()) if path.exists() else {}
        cfg["regularizer"] = {"evil": evil}
        path.write_text(yaml.safe_dump(cfg))
    resumed = _run(DLRUN, out, "-m", *args, "seed=0", f"sweep.resume={sweep_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert "completed earlier, skipped" in resumed.stdout
    assert not marker.exists()


# --- every checkpoint load is weights_only; no "defaulting to False" in any log --------------------------


@pytest.mark.slow
def test_no_log_says_weights_only_defaulted(trained_run, tmp_path):
    assert TRUST_LINE not in (trained_run / "dlrun.log").read_text()
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["status"] = "interrupted"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "dlrun.log").unlink()
    resumed = _run(DLRUN, tmp_path / "out", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert TRUST_LINE not in (run_dir / "dlrun.log").read_text()
    evaluated = _run(DLRUN_EVAL, tmp_path / "out", str(run_dir))
    assert evaluated.returncode == 0, evaluated.stderr
    assert TRUST_LINE not in evaluated.stdout + evaluated.stderr


# --- one error boundary: user and environment errors exit 2 with a panel; a bug exits 1 with one line ---


@pytest.fixture(scope="module")
def bad_places(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("bad_places")
    (base / "a_file").write_text("not a directory")
    os.mkfifo(base / "fifo")
    return {"file": str(base / "a_file"), "fifo": str(base / "fifo"), "dir": str(base)}


# (id, arguments, DLRUN_OUTPUT_DIR or None, words the panel must contain). As root, only a path that no one may
# create is unwritable: /sys refuses every mkdir (EPERM), and a path under a regular file (ENOTDIR).
ENVIRONMENT_CASES = [
    ("output-dir-is-a-file", ["debug=fast"], "{file}", ["{file}", "DLRUN_OUTPUT_DIR", "not a directory"]),
    ("output-dir-not-writable", ["debug=fast"], "/sys/dlrun_outputs", ["/sys/dlrun_outputs", "DLRUN_OUTPUT_DIR"]),
    ("sweep-output-dir-is-a-file", ["-m", "debug=fast", "seed=0,1"], "{file}", ["{file}", "DLRUN_OUTPUT_DIR"]),
    ("sweep-output-dir-not-writable", ["-m", "debug=fast", "seed=0,1"], "/sys/dlrun_outputs",
     ["/sys/dlrun_outputs", "DLRUN_OUTPUT_DIR"]),
    ("text-path-is-a-fifo", ["debug=fast", "dataset=text", "dataset.path={fifo}", "model=lstm"], None,
     ["{fifo}", "not a regular file", "dataset.path"]),
    ("text-path-is-a-device", ["debug=fast", "dataset=text", "dataset.path=/dev/zero", "model=lstm"], None,
     ["/dev/zero", "not a regular file"]),
    ("text-path-is-a-directory", ["debug=fast", "dataset=text", "dataset.path={dir}", "model=lstm"], None,
     ["{dir}", "not a regular file"]),
    ("model-too-large-for-memory", ["debug=fast", "model.width=100000000"], None,
     ["Model too large", "GiB", "model.width = 100000000"]),
    ("cnn-too-large-for-memory", ["debug=fast", "model=cnn", "dataset=digits", "model.channels=[100000,100000]"],
     None, ["Model too large", "model.channels"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", ENVIRONMENT_CASES, ids=[c[0] for c in ENVIRONMENT_CASES])
def test_environment_failures_exit_2_with_a_panel(case, bad_places, tmp_path):
    _, args, output_dir, words = case
    out = Path(output_dir.format(**bad_places)) if output_dir else tmp_path / "out"
    args = [a.format(**bad_places) for a in args]
    flags = [a for a in args if a == "-m"]  # Hydra reads -m before the overrides only
    proc = _run(DLRUN, out, *flags, *QUIET, *(a for a in args if a != "-m"), timeout=120)
    _assert_refused(proc, *(w.format(**bad_places) for w in words))


def test_a_full_disk_is_an_environment_error():
    from dlrun.error_boundary import environment_error

    with pytest.raises(OSError) as err, open("/dev/full", "w") as handle:  # every write: ENOSPC
        handle.write("x")
        handle.flush()
    user_error = environment_error(RuntimeError("writing the checkpoint failed").with_traceback(None))
    assert user_error is None  # not a machine's failure
    wrapped = RuntimeError("writing the checkpoint failed")
    wrapped.__cause__ = err.value
    assert "the disk is full" in environment_error(wrapped).message


@pytest.mark.slow
def test_dlrun_summary_shows_a_truncated_job_summary_as_unreadable(tmp_path):
    out = tmp_path / "out"
    proc = _run(DLRUN, out, "-m", *QUIET, "debug=fast", "dataset=xor", "model=logreg", "seed=0,1")
    assert proc.returncode == 0, proc.stderr
    (sweep_dir,) = (out / "sweeps").iterdir()
    first, second = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    second_summary = (second / "summary.json").read_text()
    (first / "summary.json").write_text((first / "summary.json").read_text()[:40])
    proc = _run(DLRUN_SUMMARY, out, str(sweep_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "unreadable" in proc.stdout and "1 of 2 jobs without failure" not in proc.stdout
    assert (second / "summary.json").read_text() == second_summary


BROKEN_MODEL = '''
import torch
from dlrun.models.base import Network


class Broken(Network):
    """A user's network with a bug: its forward divides by zero."""

    def __init__(self, spec, width: int = 4):
        super().__init__(spec)
        self.layer = torch.nn.Linear(spec.input_shape[-1], spec.num_outputs)

    def forward(self, x):
        return self.layer(x) / 0 if 1 // 0 else None
'''


@pytest.mark.slow
def test_a_bug_exits_1_with_one_line_and_the_traceback_in_the_log(tmp_path):
    """A genuine bug (here in a user's own network, found through the configured search path)."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "broken_net.py").write_text(BROKEN_MODEL)
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "broken.yaml").write_text("_target_: broken_net.Broken\nwidth: 4\n")
    out = tmp_path / "out"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "code"), os.environ.get("PYTHONPATH", "")])}
    args = (*QUIET, "debug=fast", "dataset=xor", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "model=broken")
    proc = _run(DLRUN, out, *args, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    error_lines = [line for line in proc.stderr.splitlines() if "ZeroDivisionError" in line]
    assert len(error_lines) == 1 and "dlrun.log" in error_lines[0], output
    (run_dir,) = [p.parent for p in (out / "runs").glob("*/*/config.yaml")]
    log = (run_dir / "dlrun.log").read_text()
    assert "Traceback (most recent call last)" in log and "1 // 0" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "ZeroDivisionError" in summary["error"]
    shown = _run(DLRUN, out, *args, env={**env, "HYDRA_FULL_ERROR": "1"})
    assert shown.returncode == 1 and "Traceback (most recent call last)" in shown.stderr


# --- sweep inputs: the search space is checked before the sweeper starts --------------------------------

SWEEP = ("-m", *QUIET, "sweep=random", "sweep.n_trials=2", "debug=fast")
SWEEP_CASES = [
    ("range-high-to-low", ["optim.lr=interval(0.1,0.01)"], ["optim.lr", "low bound comes first"]),
    ("log-range-from-zero", ["optim.lr=tag(log,interval(0,1))"], ["optim.lr", "log range must start above 0"]),
    ("log-range-below-zero", ["optim.lr=tag(log,interval(-1,1))"], ["optim.lr", "above 0"]),
    ("empty-choice", ["optim.lr=choice()"], ["optim.lr=choice()", "empty choice"]),
    ("empty-range", ["model.width=range(5,1)"], ["model.width", "range is empty"]),
    ("resume-a-file", ["sweep.resume={file}"], ["{file}", "not a sweep directory"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_an_empty_search_space_exits_2_before_the_sweep(case, bad_places, tmp_path):
    _, args, words = case
    proc = _run(DLRUN, tmp_path / "out", *SWEEP, *(a.format(**bad_places) for a in args), timeout=120)
    _assert_refused(proc, "Invalid search space" if "resume" not in case[0] else "sweep.resume",
                    *(w.format(**bad_places) for w in words))
    assert not (tmp_path / "out" / "sweeps").exists()  # refused before any job


@pytest.mark.slow
def test_a_sweep_whose_every_job_fails_exits_1_with_its_report(bad_places, tmp_path):
    proc = _run(DLRUN, tmp_path / "out", *SWEEP, "dataset=text", f"dataset.path={bad_places['fifo']}", "model=lstm",
                "optim.lr=interval(0.01,0.1)")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output
    assert "0 of 2 jobs without failure" in output and "not a regular file" in output
