"""Runs that survive: interruption and resume, divergence, bad checkpoints, bad input (issue 9).

In-process tests build the real data, network and callbacks (dlrun.run.build_experiment,
build_callbacks) on tiny data; a few end-to-end tests run the real `dlrun` / `dlrun-eval` commands.
The bad-input table runs its commands concurrently, once, and each case checks its own result.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from dlrun.errors import UserError
from dlrun.run import build_experiment, build_trainer
from dlrun.rundir import RunDir, RunInterrupted, load_checkpoint
from dlrun.training.callbacks import Diverged, DivergenceGuard
from dlrun.training.grouping import GroupedExecution
from tests.conftest import DLRUN, reads_progress_bar, run_process, sigterm_after_two_epochs

DLRUN_EVAL = [sys.executable, "-m", "dlrun.evaluate"]
QUIET = ("print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false")


def _env(output_dir: Path) -> dict[str, str]:
    env = {**os.environ, "DLRUN_OUTPUT_DIR": str(output_dir), "COLUMNS": "200"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _only_run_dir(output_dir: Path) -> Path:
    (run_dir,) = [p.parent for p in (output_dir / "runs").glob("*/*/config.yaml")]
    return run_dir


# --- resume: in process, at every kind of stopping point -----------------------------------------


class StopAt(pl.Callback):
    """Interrupt after the training batch that makes global_step == `step`, or during validation."""

    def __init__(self, step: int, in_validation: bool = False):
        self.step, self.in_validation = step, in_validation

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and not self.in_validation:
            raise RunInterrupted(signal.SIGTERM)

    def on_validation_batch_end(self, trainer, *args):
        if self.in_validation and trainer.global_step == self.step and not trainer.sanity_checking:
            raise RunInterrupted(signal.SIGTERM)


def _fit(cfg: DictConfig, run_dir: RunDir, stop: pl.Callback | None = None, resume: bool = False) -> dict:
    """The run flow of dlrun.run, in process: returns what summary.json would hold, or {} if stopped."""
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, _, module = build_experiment(cfg, {"dataset": "digits", "model": "mlp"})
    trainer, tracker, _ = build_trainer(cfg, run_dir, {}, extra_callbacks=[stop] if stop else [])
    ckpt = str(run_dir.checkpoint("last")) if resume else None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    except RunInterrupted:
        return {}
    return {
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best": tracker.state_dict(),  # the best value, epoch and metrics, and the last epoch's
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "weights": {k: v.clone() for k, v in module.state_dict().items()},
        "direct_steps": next(c for c in trainer.callbacks if isinstance(c, GroupedExecution)).direct_steps,
    }


@pytest.fixture(scope="module")
def resume_cfg() -> DictConfig:
    """Adam (moments), a step schedule, dropout (random state), early stopping: all must survive."""
    return _small_run_cfg()


def _small_run_cfg(*overrides: str) -> DictConfig:
    """4 training batches an epoch, one per Lightning call unless overridden."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dlrun import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[
            "dataset.n_train=128", "dataset.batch_size=32", "model.width=32", "model.depth=1",
            "regularizer=dropout", "scheduler=step", "scheduler.step_size=1", "optim.lr=0.01",
            "trainer.max_epochs=5", "callbacks.early_stopping.patience=1", "callbacks.progress_bar=false",
            "callbacks.model_summary=false", "trainer.steps_per_execution=1", *overrides,
        ])


@pytest.fixture(scope="module")
def uninterrupted(resume_cfg, tmp_path_factory) -> dict:
    return _fit(resume_cfg, RunDir(tmp_path_factory.mktemp("whole")))


@pytest.mark.parametrize(
    "stop",
    [StopAt(1), StopAt(4), StopAt(5), StopAt(10), StopAt(8, in_validation=True)],
    ids=["first-step", "last-step-of-epoch-0", "first-step-of-epoch-1", "mid-epoch-2", "in-validation"],
)
def test_resume_from_any_point_equals_uninterrupted(resume_cfg, uninterrupted, tmp_path, stop):
    run_dir = RunDir(tmp_path)
    assert _fit(resume_cfg, run_dir, stop=stop) == {}
    assert run_dir.checkpoint("last").is_file()
    resumed = _fit(resume_cfg, run_dir, resume=True)
    _assert_same_run(resumed, uninterrupted)


@pytest.mark.parametrize("steps", [3, 16])
def test_grouped_steps_train_exactly_like_single_steps(resume_cfg, uninterrupted, tmp_path, steps):
    """trainer.steps_per_execution changes only how often Lightning's loop runs, never the numbers;
    here 4 batches an epoch come as groups of 3 and 1, or all 4 at once."""
    grouped = OmegaConf.merge(resume_cfg, {"trainer": {"steps_per_execution": steps}})
    _assert_same_run(_fit(grouped, RunDir(tmp_path)), uninterrupted)


@pytest.mark.parametrize("steps", [1, 3])
def test_loggers_count_optimizer_steps_whatever_the_grouping(tmp_path, steps):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _small_run_cfg("logger=[csv,tensorboard]", "trainer.max_epochs=2", f"trainer.steps_per_execution={steps}")
    _fit(cfg, RunDir(tmp_path))
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    for key in ("train/loss", "val/loss"):  # each epoch's row at its last step (4 steps an epoch)
        assert [event.step for event in board.Scalars(key)] == [3, 7], key


def test_resume_of_a_grouped_run_interrupted_mid_epoch(resume_cfg, uninterrupted, tmp_path):
    grouped = OmegaConf.merge(resume_cfg, {"trainer": {"steps_per_execution": 3}})
    run_dir = RunDir(tmp_path)
    assert _fit(grouped, run_dir, stop=StopAt(7)) == {}  # after the first group of epoch 1
    _assert_same_run(_fit(grouped, run_dir, resume=True), uninterrupted)


class CountsBackwards(pl.Callback):
    """A callback on a backward hook: Experiment then steps through Lightning's dispatch, which calls it."""

    def __init__(self):
        self.calls = 0

    def on_after_backward(self, trainer, pl_module):
        self.calls += 1


def test_direct_steps_train_exactly_like_lightnings_dispatch(resume_cfg, uninterrupted, tmp_path):
    counter = CountsBackwards()
    dispatched = _fit(resume_cfg, RunDir(tmp_path), stop=counter)
    assert uninterrupted["direct_steps"] and not dispatched["direct_steps"]
    assert counter.calls == uninterrupted["global_step"] > 0
    _assert_same_run(dispatched, uninterrupted)


def test_progress_bar_counts_steps_whatever_the_grouping(resume_cfg, tmp_path):
    cfg = OmegaConf.merge(resume_cfg, {"trainer": {"steps_per_execution": 3, "max_epochs": 2},
                                       "callbacks": {"progress_bar": True}})
    reader = reads_progress_bar()
    _fit(cfg, RunDir(tmp_path), stop=reader)
    assert reader.seen == [(4, 4), (4, 4)]  # 4 batches an epoch, in groups of 3 and 1


def _assert_same_run(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["epochs"] == uninterrupted["epochs"] and resumed["global_step"] == uninterrupted["global_step"]
    assert resumed["best"] == uninterrupted["best"]
    assert resumed["metrics"] == uninterrupted["metrics"]  # lr included: the schedule was restored
    for name, tensor in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), name


@pytest.mark.parametrize("steps_per_execution", [1, 3])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1], ids=["SIGINT", "SIGTERM", "SIGUSR1"])
def test_signals_stop_at_the_next_batch(resume_cfg, tmp_path, signum, steps_per_execution):
    """The handler only records the signal; the run stops cleanly at the batch's end, within a group of batches
    too (4 batches an epoch in groups of 3 and 1: the signal arrives in step 5, the middle of a group)."""
    grouped = OmegaConf.merge(resume_cfg, {"trainer": {"steps_per_execution": steps_per_execution}})
    pl.seed_everything(0, verbose=False)
    datamodule, _, module = build_experiment(grouped, {})
    trainer, _, interruption = build_trainer(grouped, RunDir(tmp_path), {})

    def kill_during_step_5(network, inputs):
        if trainer.training and trainer.global_step == 5:
            os.kill(os.getpid(), signum)

    module.network.register_forward_pre_hook(kill_during_step_5)
    before = signal.getsignal(signum)
    with pytest.raises(RunInterrupted) as caught, interruption.catching():
        trainer.fit(module, datamodule=datamodule)
    assert caught.value.signum == signum and caught.value.exit_code == 128 + signum
    assert trainer.global_step == 6  # the step in progress finished, no other began
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert signal.getsignal(signum) == before


# --- resume: end to end, with a real SIGTERM -----------------------------------------------------


@pytest.mark.slow
def test_sigterm_then_resume_ends_like_the_run_left_alone(tmp_path):
    args = [*DLRUN, *QUIET, "dataset.n_train=300", "dataset.batch_size=16", "regularizer=dropout",
            "scheduler=step", "scheduler.step_size=2", "callbacks=no_early_stopping", "trainer.max_epochs=10"]
    alone = run_process(args, env=_env(tmp_path / "alone"), timeout=600)
    assert alone.returncode == 0, alone.stderr

    out = tmp_path / "killed"
    code, _, stderr = sigterm_after_two_epochs(args, _env(out), out)
    assert code == 128 + signal.SIGTERM, stderr
    run_dir = _only_run_dir(out)
    assert f"dlrun resume={run_dir}" in stderr.replace("\n", "") and "Traceback" not in stderr
    interrupted = _summary(run_dir)
    assert interrupted["status"] == "interrupted" and 2 <= interrupted["epochs"] < 10

    resumed = run_process([*DLRUN, f"resume={run_dir}"], env=_env(out), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _only_run_dir(out) == run_dir  # same directory, no new one
    final, reference = _summary(run_dir), _summary(_only_run_dir(tmp_path / "alone"))
    assert final["status"] == "completed" and len(final["resumed"]) == 1
    assert final["overrides"] == reference["overrides"]
    for key in ("metrics", "last_epoch", "best_value", "best_epoch", "epochs", "global_step"):
        assert final[key] == reference[key], key
    assert (run_dir / "metrics.csv").read_text() == (_only_run_dir(tmp_path / "alone") / "metrics.csv").read_text()


# --- divergence -------------------------------------------------------------------------------------


class ScriptedLoss(pl.LightningModule):
    """A real optimization whose loss is replaced by `losses[step]` where given (NaN, a spike)."""

    def __init__(self, losses: dict[int, float]):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.losses = losses

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean() + 1.0
        step = self.trainer.fit_loop.epoch_loop.total_batch_idx
        return loss * self.losses[step] if step in self.losses else loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(40, 2), batch_size=4)  # 10 batches

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


@pytest.mark.parametrize(
    ("losses", "factor", "step", "reason"),
    [
        ({13: float("nan")}, 1e4, 13, "loss is nan"),
        ({25: float("inf")}, None, 25, "loss is inf"),
        ({7: 1e5}, 1e4, 7, "exceeds 10000 x the first step's loss"),
        ({7: 1e3}, 1e4, None, None),  # a spike below the factor is not divergence
    ],
    ids=["nan", "inf", "explodes", "spike-below-factor"],
)
def test_divergence_stops_at_the_first_bad_step(losses, factor, step, reason):
    guard = DivergenceGuard(factor)
    trainer = pl.Trainer(max_epochs=4, callbacks=[guard], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    if step is None:
        trainer.fit(ScriptedLoss(losses))
        assert trainer.global_step == 40
        return
    with pytest.raises(Diverged) as caught:
        trainer.fit(ScriptedLoss(losses))
    assert caught.value.step == step and caught.value.epoch == step // 10
    assert reason in caught.value.reason
    assert trainer.global_step == step + 1  # stopped at once on the CPU


@pytest.mark.parametrize(("bad_step", "stopped_after"), [(5, 8), (9, 10), (1, 4)])
def test_divergence_read_every_n_steps_and_at_each_epochs_last_batch(bad_step, stopped_after):
    """As on a GPU: the flags are read every `check_every` steps and at the epoch's last batch (10 here)."""
    trainer = pl.Trainer(max_epochs=2, callbacks=[DivergenceGuard(1e4, check_every=4)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(Diverged) as caught:
        trainer.fit(ScriptedLoss({bad_step: float("nan")}))
    assert caught.value.step == bad_step and caught.value.epoch == 0
    assert trainer.global_step == stopped_after


@pytest.mark.slow
def test_divergent_run_and_a_sweep_containing_it(tmp_path):
    """A diverged run is a result (exit 0, status diverged); a sweep with it completes its other jobs."""
    single = run_process([*DLRUN, *QUIET, "optim=sgd", "optim.lr=1e4", "debug=fast"], env=_env(tmp_path / "one"),
                         timeout=600)
    assert single.returncode == 0, single.stderr
    summary = _summary(_only_run_dir(tmp_path / "one"))
    assert summary["status"] == "diverged" and summary["diverged"]["epoch"] == 0
    assert summary["diverged"]["step"] <= 2 and "exceeds" in summary["diverged"]["reason"]

    # dlrun's own sweep launcher (hydra/launcher=dlrun, the default for -m): one process per job
    sweep = run_process([*DLRUN, "-m", *QUIET, "optim=sgd", "optim.lr=0.01,1e4", "debug=fast"],
                        env=_env(tmp_path / "sweep"), timeout=600)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    jobs = sorted((tmp_path / "sweep" / "sweeps").glob("*/*/summary.json"))
    assert sorted(json.loads(p.read_text())["status"] for p in jobs) == ["completed", "diverged"]
    assert "diverged" in sweep.stdout


# --- checkpoints ------------------------------------------------------------------------------------


def test_load_checkpoint_refuses_bad_files_clearly(tmp_path):
    good = {"state_dict": {"w": torch.zeros(2, 3)}, "epoch": 1}
    torch.save(good, tmp_path / "good.ckpt")
    assert load_checkpoint(tmp_path / "good.ckpt", {"w": torch.ones(2, 3)})["epoch"] == 1

    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.ckpt").write_bytes(os.urandom(4096))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    torch.save({"state_dict": {}, "hook": print}, tmp_path / "code.ckpt")  # loading it would import a function
    with (tmp_path / "pickle.ckpt").open("wb") as handle:
        pickle.dump({"state_dict": {}}, handle)
    cases = {
        "truncated.ckpt": "it is truncated",
        "random.ckpt": "it is not a PyTorch checkpoint",
        "pickle.ckpt": "it is not a PyTorch checkpoint",
        "empty.ckpt": "it is empty",
        "code.ckpt": "could run code",
        "plain.pt": "not a Lightning checkpoint",
        "missing.ckpt": "is not a file",
    }
    for name, expected in cases.items():
        with pytest.raises(UserError, match=expected) as caught:
            load_checkpoint(tmp_path / name)
        assert name in caught.value.message and caught.value.title == "Unusable checkpoint"
    with pytest.raises(UserError, match=r"another model[\s\S]*w: \(2, 3\) in the checkpoint, \(4, 3\) in the model"):
        load_checkpoint(tmp_path / "good.ckpt", {"w": torch.zeros(4, 3)})
    with pytest.raises(UserError, match="missing 1 tensor"):
        load_checkpoint(tmp_path / "good.ckpt", {"w": torch.zeros(2, 3), "b": torch.zeros(3)})


# --- dlrun-eval and the bad-input table, on conftest.py's trained run ----------------------------


@pytest.mark.slow
def test_dlrun_eval_reproduces_the_runs_test_metrics(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    proc = run_process([*DLRUN_EVAL, str(run_dir)], env={**os.environ, "COLUMNS": "200"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "test/acc" in proc.stdout
    result = json.loads((run_dir / "eval_test.json").read_text())
    # the run tested best.ckpt on the same split: the same numbers
    assert result["metrics"] == pytest.approx(
        {k: v for k, v in _summary(run_dir)["metrics"].items() if k.startswith("test/")}, rel=1e-6)
    assert result["checkpoint"].endswith("best.ckpt") and result["samples"] == 270

    proc = run_process([*DLRUN_EVAL, str(run_dir / "checkpoints" / "last.ckpt"), "--split", "val"], timeout=600)
    assert proc.returncode == 0, proc.stderr
    val = json.loads((run_dir / "eval_val.json").read_text())
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert val["metrics"]["val/loss"] == pytest.approx(float(rows[-1]["val/loss"]), rel=1e-5)


def _broken_copy(trained_run: Path, where: Path, status: str, checkpoint: str, content: bytes | None) -> Path:
    """A copy of the trained run with `status` in its summary and `checkpoint` replaced by `content`."""
    shutil.copytree(trained_run, where)
    summary = _summary(where)
    summary["status"] = status
    (where / "summary.json").write_text(json.dumps(summary))
    target = where / "checkpoints" / checkpoint
    if content is not None:
        target.write_bytes(content)
    return where


@pytest.fixture(scope="module")
def places(trained_run, tmp_path_factory) -> dict[str, str]:
    """Paths that bad inputs point at: missing, not a run, broken runs, garbage files."""
    base = tmp_path_factory.mktemp("places")
    (base / "notrun").mkdir()
    (base / "notrun" / "notes.txt").write_text("not a run")
    for name, status in (("completed", "completed"), ("diverged", "diverged")):
        (base / name).mkdir()
        (base / name / "config.yaml").write_text("model: {}\ndataset: {}\n")
        (base / name / "summary.json").write_text(json.dumps({"status": status}))
    (base / "garbage").mkdir()
    (base / "garbage" / "config.yaml").write_bytes(b"\x00\xff{[: not yaml \x9c")
    (base / "binary.txt").write_bytes(bytes(range(128, 256)) * 4)
    ckpt = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    noise = os.urandom(len(ckpt) // 3)
    return {
        "missing": str(base / "does-not-exist"),
        "notrun": str(base / "notrun"),
        "completed": str(base / "completed"),
        "diverged": str(base / "diverged"),
        "garbage": str(base / "garbage"),
        "binary": str(base / "binary.txt"),
        "truncated_last": str(_broken_copy(trained_run, base / "t_last", "interrupted", "last.ckpt", ckpt[:5000])),
        "random_last": str(_broken_copy(trained_run, base / "r_last", "interrupted", "last.ckpt", noise)),
        "truncated_best": str(_broken_copy(trained_run, base / "t_best", "completed", "best.ckpt", ckpt[:5000])),
        "random_best": str(_broken_copy(trained_run, base / "r_best", "completed", "best.ckpt", noise)),
    }


# (id, command, arguments, words the message must contain). {name} is a path from `places`.
BAD_INPUTS: list[tuple[str, list[str], list[str], list[str]]] = [
    ("misspelled-model", DLRUN, ["model=mlpp"], ["mlpp", "Available options", "mlp"]),
    ("misspelled-optim", DLRUN, ["optim=adamm"], ["adamm", "adam"]),
    ("misspelled-dataset", DLRUN, ["dataset=digitz"], ["digitz", "digits"]),
    ("misspelled-in-list", DLRUN, ["regularizer=[l2,dropuot]"], ["dropuot", "Did you mean 'dropout'"]),
    ("misspelled-experiment", DLRUN, ["experiment=nope"], ["nope", "lstm_digits"]),
    ("unknown-key", DLRUN, ["model.widht=3"], ["widht", "Did you mean 'width'", "Valid keys of model", "depth"]),
    ("unknown-top-level-key", DLRUN, ["seeed=3"], ["seeed", "Did you mean 'seed'"]),
    ("lr-not-a-number", DLRUN, ["optim.lr=abc"], ["optim.lr", "a number > 0"]),
    ("lr-negative", DLRUN, ["optim.lr=-1"], ["optim.lr = -1", "> 0"]),
    ("epochs-zero", DLRUN, ["trainer.max_epochs=0"], ["trainer.max_epochs = 0", ">= 1"]),
    ("epochs-fractional", DLRUN, ["trainer.max_epochs=1.5"], ["trainer.max_epochs", "an integer"]),
    ("epochs-min-above-max", DLRUN, ["trainer.min_epochs=5", "trainer.max_epochs=2"], ["exceeds trainer.max_epochs"]),
    ("activation-unknown", DLRUN, ["model.activation=relux"], ["model.activation", "relu"]),
    ("batch-size-zero", DLRUN, ["dataset.batch_size=0"], ["dataset.batch_size"]),
    ("dropout-above-one", DLRUN, ["model.dropout=1.5"], ["model.dropout", "[0, 1)"]),
    ("fractions-leave-no-training", DLRUN, ["dataset.val_fraction=0.6", "dataset.test_fraction=0.5"], ["< 1"]),
    ("seed-negative", DLRUN, ["seed=-1"], ["seed = -1"]),
    ("mode-unknown", DLRUN, ["callbacks.mode=maximum"], ["callbacks.mode", "min, max"]),
    ("precision-unknown", DLRUN, ["hardware.precision=8"], ["hardware.precision", "16-mixed"]),
    ("divergence-factor-below-one", DLRUN, ["callbacks.divergence.factor=0.5"], ["callbacks.divergence.factor", "> 1"]),
    ("limit-negative", DLRUN, ["trainer.limit_train_batches=-2"], ["trainer.limit_train_batches"]),
    ("steps-per-execution-zero", DLRUN, ["trainer.steps_per_execution=0"],
     ["trainer.steps_per_execution = 0", "auto or an integer >= 1"]),
    ("steps-per-execution-under-ddp", DLRUN, ["hardware=ddp_cpu", "trainer.steps_per_execution=4"],
     ["trainer.steps_per_execution = 4", "DDP", "auto"]),
    ("unparseable", DLRUN, ["optim.lr=[1,"], ["Cannot parse", "key=value"]),
    ("gpu-without-gpu", DLRUN, ["hardware.accelerator=gpu"], ["gpu", "hardware=cpu"]),
    ("incompatible-model-data", DLRUN, ["model=cnn", "dataset=iris"], ["model=cnn", "dataset=iris", "flat"]),
    ("missing-data-root", DLRUN, ["dataset=mnist", "dataset.download=false", "dataset.root={missing}"],
     ["mnist", "missing", "does-not-exist"]),
    ("unreadable-data-file", DLRUN, ["dataset=text", "dataset.path={binary}"], ["binary.txt", "UTF-8"]),
    ("resume-missing", DLRUN, ["resume={missing}"], ["does-not-exist", "does not exist"]),
    ("resume-not-a-run", DLRUN, ["resume={notrun}"], ["notrun", "not a dlrun run directory"]),
    ("resume-completed", DLRUN, ["resume={completed}"], ["status 'completed'", "nothing to resume"]),
    ("resume-diverged", DLRUN, ["resume={diverged}"], ["status 'diverged'"]),
    ("resume-with-overrides", DLRUN, ["resume={completed}", "optim.lr=0.1"], ["nothing else", "new run"]),
    ("resume-unreadable-config", DLRUN, ["resume={garbage}"], ["config.yaml", "cannot be read"]),
    ("resume-truncated-checkpoint", DLRUN, ["resume={truncated_last}"], ["last.ckpt", "truncated"]),
    ("resume-random-checkpoint", DLRUN, ["resume={random_last}"], ["last.ckpt", "not a PyTorch checkpoint"]),
    ("eval-missing", DLRUN_EVAL, ["{missing}"], ["does not exist"]),
    ("eval-not-a-run", DLRUN_EVAL, ["{notrun}"], ["not a dlrun run directory"]),
    ("eval-bad-split", DLRUN_EVAL, ["{notrun}", "--split", "tset"], ["invalid choice", "tset"]),
    ("eval-truncated-checkpoint", DLRUN_EVAL, ["{truncated_best}"], ["best.ckpt", "truncated"]),
    ("eval-random-checkpoint", DLRUN_EVAL, ["{random_best}/checkpoints/best.ckpt"], ["best.ckpt", "not a PyTorch"]),
]


@pytest.fixture(scope="module")
def bad_input_results(places, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every BAD_INPUTS command, two at a time (most fail in ~1 s, before torch is imported)."""
    out = tmp_path_factory.mktemp("bad")

    def run(case: tuple[str, list[str], list[str], list[str]]) -> subprocess.CompletedProcess:
        _, command, args, _ = case
        return run_process([*command, *(a.format(**places) for a in args)], env=_env(out), cwd=out, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([c[0] for c in BAD_INPUTS], pool.map(run, BAD_INPUTS), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_and_names_the_problem(case, bad_input_results, places):
    name, _, args, words = case
    if name == "gpu-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = bad_input_results[name]
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text
    flat = " ".join(text.replace("│", " ").split())  # undo the panel's line wrapping
    for word in words:
        assert " ".join(word.format(**places).split()) in flat, f"{word!r} not in:\n{text}"
    assert not list(Path(places["notrun"]).glob("*.json"))  # nothing was written into a non-run


@pytest.mark.slow
def test_bad_checkpoints_are_refused_by_resume_and_eval(bad_input_results, places):
    """Truncated and random checkpoints: exit 2, a panel naming the file, nothing trained or written."""
    for case in ("resume-truncated-checkpoint", "resume-random-checkpoint", "eval-truncated-checkpoint",
                 "eval-random-checkpoint"):
        proc = bad_input_results[case]
        assert proc.returncode == 2 and "Unusable checkpoint" in proc.stderr, proc.stderr
    for run in ("truncated_last", "random_last"):
        assert _summary(Path(places[run]))["status"] == "interrupted"  # untouched: the resume never began
    for run in ("truncated_best", "random_best"):
        assert not (Path(places[run]) / "eval_test.json").exists()


def test_every_bad_input_case_is_distinct():
    ids = [c[0] for c in BAD_INPUTS]
    assert len(ids) >= 25 and len(set(ids)) == len(ids)
    assert len({tuple(c[2]) for c in BAD_INPUTS}) == len(BAD_INPUTS)

