"""Shared fixtures: run the real `dlrun` command in a temporary directory, compose real configs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from dlrun import CONF_DIR
from dlrun.sweep.fork_server import ForkServer

DLRUN = [sys.executable, "-m", "dlrun.cli"]


@dataclass
class Result:
    """A finished `dlrun` process and the directories it wrote."""

    returncode: int
    stdout: str
    stderr: str
    output_dir: Path

    @property
    def run_dirs(self) -> list[Path]:
        return sorted(p.parent for p in (self.output_dir / "runs").glob("*/*/config.yaml"))

    @property
    def run_dir(self) -> Path:
        dirs = self.run_dirs
        assert len(dirs) == 1, f"expected one run directory, found {dirs}\n{self.stdout}\n{self.stderr}"
        return dirs[0]

    def summary(self, run_dir: Path | None = None) -> dict:
        return json.loads(((run_dir or self.run_dir) / "summary.json").read_text())


def dlrun_in(directory: Path) -> Callable[..., Result]:
    """Run `dlrun ARGS...` as a user would, in `directory`, with outputs under directory/outputs."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True) -> Result:
        full_env = {**os.environ, "DLRUN_OUTPUT_DIR": str(directory / "outputs"), "COLUMNS": "120"}
        full_env.pop("HYDRA_FULL_ERROR", None)
        full_env.update(env or {})
        proc = run_process([*DLRUN, *args], env=full_env, cwd=directory, timeout=timeout)
        result = Result(proc.returncode, proc.stdout, proc.stderr, directory / "outputs")
        if check and result.returncode != 0:
            raise AssertionError(
                f"dlrun {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    return run


# --- the tests' fork server -------------------------------------------------------------------------------
# A fresh `python -m dlrun.cli` spends several CPU seconds importing torch, Lightning and Hydra; the suite starts
# hundreds. run_process forks them from one warm server instead: the sweep's fork server, whose children are what
# a fresh process would be (tests/test_fork_server.py checks that they compute the same numbers). A command still
# starts as a fresh process where its start would differ from the server's: an environment that differs in what
# is read at import (PYTHONPATH, threads, ...), and DDP, whose ranks re-run the command line. The tests that are
# about a fresh process (start-up, imports, signals) start it themselves. DLRUN_TESTS_FORK=0 turns forking off.

_RUN_TIME_ENV = ("DLRUN_", "WANDB_", "MLFLOW_", "HYDRA_FULL_ERROR", "COLUMNS")  # read after start-up, not at import
_FRESH_ARGS = ("ddp", "multi_gpu", "devices", "strategy", "num_nodes")
# The server's environment, as the session started: a test that changes os.environ later changes no fork's start.
_SERVER_ENV = {key: value for key, value in os.environ.items() if not key.startswith(_RUN_TIME_ENV)}
_server: ForkServer | None = None
_server_lock = threading.Lock()  # the fuzz tests run commands from two threads; the server's channel is one


def run_process(command: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True), forked from the tests' server where it can be."""
    env = dict(os.environ if env is None else env)
    server = _fork_server() if _forkable(command, env) else None
    if server is None:
        return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory() as captured:
        stdout, stderr = Path(captured, "stdout"), Path(captured, "stderr")
        with _server_lock:
            job = server.start(list(command[3:]), env, stdout, cwd=cwd, stderr=stderr, module=command[2])
        deadline = time.monotonic() + timeout
        while True:
            with _server_lock:
                code = job.poll()
            if code is not None:
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):  # it ended just now
                    os.killpg(job.pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(list(command), timeout)
            time.sleep(0.02)
        return subprocess.CompletedProcess(list(command), code, stdout.read_text(), stderr.read_text())


def _forkable(command: Sequence[str], env: dict[str, str]) -> bool:
    """A `python -m dlrun.…` command whose start the server's would not change."""
    if os.environ.get("DLRUN_TESTS_FORK") == "0" or list(command[:2]) != [sys.executable, "-m"]:
        return False
    if not command[2].startswith("dlrun.") or command[2] == "dlrun.sweep.fork_server":
        return False
    if any(word in arg for arg in command[3:] for word in _FRESH_ARGS):
        return False
    return all(env.get(key) == _SERVER_ENV.get(key) or key.startswith(_RUN_TIME_ENV) for key in {*env, *_SERVER_ENV})


def _fork_server() -> ForkServer | None:
    """The session's server, started on first use; None where it cannot fork (its log says why)."""
    global _server
    with _server_lock:
        if _server is None:
            log = Path(tempfile.gettempdir()) / f"dlrun-tests-fork-server-{os.getpid()}.log"
            _server = ForkServer(_SERVER_ENV, stderr=log)
        return _server if _server.ready(wait=True) else None


def pytest_sessionfinish(session, exitstatus) -> None:
    if _server is not None:
        _server.close()


@pytest.fixture
def run_dlrun(tmp_path: Path) -> Callable[..., Result]:
    """Run `dlrun ARGS...` as a user would, in tmp_path, with outputs under tmp_path/outputs."""
    return dlrun_in(tmp_path)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A completed run (the default MLP, 2 epochs on 200 digits) for the tests that read or break a run
    directory; they change only copies of it. Its dlrun.log is that of a normal run."""
    result = dlrun_in(tmp_path_factory.mktemp("trained"))(
        "print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false",
        "trainer.max_epochs=2", "dataset.n_train=200")
    return result.run_dir


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose dlrun's real config with overrides, as Hydra does for the command line."""

    def _compose(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)

    return _compose


@pytest.fixture(scope="session")
def dlrun_image() -> str:
    """The Dockerfile built with podman (once per session; layers cached across sessions): its name."""
    from tests import image

    reason = image.unavailable()
    if reason:
        pytest.skip(reason)
    return image.build()


@pytest.fixture
def datamodule(compose_cfg):
    """Build a data set exactly as `dlrun dataset=NAME OVERRIDES...` does (validated config, then instantiate)."""
    from hydra.utils import instantiate

    from dlrun.config import find_problems

    def build(name: str, *overrides: str, seed: int = 0):
        cfg = compose_cfg(f"dataset={name}", f"seed={seed}", *overrides)
        assert find_problems(cfg) == []
        return instantiate(cfg.dataset, seed=cfg.seed, name=name)

    return build


def reads_progress_bar():
    """A callback that keeps (completed, total) of the progress bar's training task at every epoch's end."""
    import pytorch_lightning as pl

    class ReadsProgressBar(pl.Callback):
        def __init__(self):
            self.seen: list[tuple[float, float | None]] = []

        def on_train_epoch_end(self, trainer, pl_module):
            bar = trainer.progress_bar_callback
            task = next(t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id)
            self.seen.append((task.completed, task.total))

    return ReadsProgressBar()


def sigterm_after_two_epochs(command: list[str], env: dict[str, str], out: Path) -> tuple[int, str, str]:
    """Start `command` (a dlrun run writing under `out`), send SIGTERM once metrics.csv holds two epochs (the run
    is in its third), and return its exit code, stdout and stderr."""
    import signal
    import time

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        rows = list(out.glob("runs/*/*/metrics.csv"))
        if rows and len(rows[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks train many times faster on one thread than on two busy cores that spin-wait
    (a module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
