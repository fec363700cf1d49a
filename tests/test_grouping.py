"""Grouped execution (dlrun/training/grouping.py): groups of any loader's batches, gradient accumulation,
the last batch of one sample, and every use of Lightning's private API, each checked so that a Lightning
upgrade that changes one fails here, by name."""

from __future__ import annotations

import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.core.optimizer import LightningOptimizer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from dlrun.data.datamodule import IndexBatches
from dlrun.errors import UserError
from dlrun.run import build_experiment, build_trainer
from dlrun.rundir import RunDir
from dlrun.training.grouping import GroupedBatches, GroupedExecution, restart_epoch_progress
from tests.conftest import reads_progress_bar

SMALL = ["dataset.n_train=120", "model.width=16", "model.depth=1", "optim=sgd", "optim.lr=0.1",
         "callbacks=no_early_stopping", "callbacks.progress_bar=false", "callbacks.model_summary=false"]


def _fit(cfg, *callbacks: pl.Callback, run_dir: RunDir) -> tuple[pl.Trainer, pl.LightningModule]:
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, _, module = build_experiment(cfg, {"dataset": "digits", "model": "mlp"})
    trainer, _, _ = build_trainer(cfg, run_dir, {}, extra_callbacks=list(callbacks))
    trainer.fit(module, datamodule=datamodule, weights_only=True)
    return trainer, module


# --- groups and limits ---------------------------------------------------------------------------
def test_grouped_batches_are_the_same_batches_and_limits_count_batches():
    """trainer.steps_per_execution groups the epoch's batches without changing them; limits count batches."""
    x, y = torch.arange(100.0).unsqueeze(1), torch.arange(100)
    loader = IndexBatches(x, y, 8, shuffle=True, seed=3, epoch=lambda: 2)

    single = list(loader)
    assert len(loader) == len(single) == 13 and sorted(torch.cat([b[1] for b in single]).tolist()) == list(range(100))
    grouped = GroupedBatches(loader, 5)
    assert len(grouped) == 3 and [len(g) for g in grouped] == [5, 5, 3]
    for (gx, gy), (sx, sy) in zip([b for group in grouped for b in group], single, strict=True):
        assert torch.equal(gx, sx) and torch.equal(gy, sy)
    assert [len(g) for g in GroupedBatches(loader, 5, limit=7)] == [5, 2] and len(GroupedBatches(loader, 5, 7)) == 2
    assert GroupedBatches(loader, 1, 0.5).n_batches() == 6 and GroupedBatches(loader, 1, 0.01).n_batches() == 1
    assert len(GroupedBatches(loader, 1, 0.0)) == 0
    assert [len(g) for g in GroupedBatches(loader, 16)] == [13]


def test_a_plain_dataloader_is_grouped_the_same_way():
    x, y = torch.randn(50, 3), torch.arange(50)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # yields [x, y] lists, the last of 2 samples
    groups = list(GroupedBatches(loader, 3, limit=5))
    assert [len(g) for g in groups] == [3, 2]
    assert torch.equal(torch.cat([b[1] for g in groups for b in g]), torch.arange(40))


def test_a_group_draws_its_batches_as_training_reaches_them():
    """Lightning fetches the next call's group before it runs the current call: that fetch draws nothing, and
    each batch is drawn when the call reaches it (a streaming loader's workers load while the batches before
    train). Groups used out of order still hold their own batches."""
    drawn = []

    class Counted:  # a sized loader that records every batch drawn from it
        def __len__(self):
            return 10

        def __iter__(self):
            for i in range(10):
                drawn.append(i)
                yield torch.full((2, 1), float(i)), torch.tensor([i, i])

    groups = iter(GroupedBatches(Counted(), 4))
    first, second = next(groups), next(groups)
    assert drawn == [] and len(first) == len(second) == 4
    x, _ = first[0]
    assert drawn == [0] and x[0, 0] == 0
    assert [int(y[0]) for _, y in second] == [4, 5, 6, 7]  # first's rest drawn before
    assert [int(y[0]) for _, y in first] == [0, 1, 2, 3] and drawn == list(range(8))
    moved = next(groups).each(lambda batch: (batch[0] + 100, batch[1]))  # as transfer_batch_to_device
    assert [float(x[0, 0]) for x, _ in moved] == [108, 109] and next(groups, None) is None


def test_steps_per_execution_auto_and_ddp():
    assert GroupedExecution("auto").resolve(1).steps_per_execution == 16
    assert GroupedExecution("auto").resolve(2).steps_per_execution == 1
    with pytest.raises(UserError, match="DDP"):
        GroupedExecution(4).resolve(2)


def test_lightning_sees_only_its_own_trainer_keys():
    args = {"max_epochs": 3, "steps_per_execution": 4, "accumulate_grad_batches": 2, "limit_train_batches": 7}
    execution = GroupedExecution.from_trainer_args(args)
    assert args == {"max_epochs": 3, "limit_train_batches": 1.0}
    assert (execution.steps_per_execution, execution.accumulate_grad_batches, execution.limit_train_batches) == (4, 2, 7)
    args = {"limit_train_batches": 0}
    GroupedExecution.from_trainer_args(args)
    assert args == {"limit_train_batches": 0}  # no training at all stays Lightning's business


# --- a training batch of one sample ---------------------------------------------------------------
def test_training_drops_a_last_batch_of_one_sample_only():
    """docs/datasets.md: a training epoch of n samples in batches of b > 1 leaves out one sample (a different
    one each epoch) when n % b == 1; otherwise it covers all n. Evaluation covers every sample."""
    for n, b, covered in [(397, 12, 396), (398, 12, 398), (12, 12, 12), (13, 12, 12), (1, 12, 1), (5, 1, 5)]:
        x, y = torch.zeros(n, 1), torch.arange(n)
        batches = IndexBatches(x, y, b, shuffle=True)
        assert sum(len(by) for _, by in batches) == covered and len(batches) == -(-covered // b)
        assert sum(len(by) for _, by in IndexBatches(x, y, b, shuffle=False)) == n


@pytest.mark.slow
def test_batch_norm_trains_when_the_last_batch_would_hold_one_sample(run_dlrun, compose_cfg):
    cfg = compose_cfg("dataset=breast_cancer", "dataset.batch_size=12")
    datamodule = instantiate(cfg.dataset, seed=cfg.seed)
    datamodule.prepare()
    assert len(datamodule.splits["train"][0]) % 12 == 1  # 397 samples: 33 batches of 12 and one of 1
    result = run_dlrun("dataset=breast_cancer", "model.batch_norm=true", "dataset.batch_size=12", "trainer.max_epochs=2")
    summary = result.summary()
    assert summary["status"] == "completed" and summary["global_step"] == 2 * 33


# --- gradient accumulation ------------------------------------------------------------------------
def test_accumulated_micro_batches_step_like_one_large_batch(compose_cfg, tmp_path):
    """SGD on an MLP without batch norm: 4 micro-batches of 8 give the weights of one batch of 32. 120
    samples: 15 micro-batches, so the epoch's last window holds 3 (24 samples, like the last large batch)."""
    large = compose_cfg(*SMALL, "dataset.batch_size=32", "trainer.max_epochs=2")
    micro = compose_cfg(*SMALL, "dataset.batch_size=8", "trainer.max_epochs=2", "trainer.accumulate_grad_batches=4",
                        "trainer.steps_per_execution=3")  # windows span Lightning calls
    (large_trainer, large_module), (micro_trainer, micro_module) = (
        _fit(cfg, run_dir=RunDir(tmp_path / name)) for cfg, name in ((large, "large"), (micro, "micro"))
    )
    assert micro_trainer.global_step == large_trainer.global_step == 2 * 4
    for name, weight in large_module.state_dict().items():
        torch.testing.assert_close(micro_module.state_dict()[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    # every sample is scored, with the weights of its step: the same epoch loss
    assert float(micro_trainer.callback_metrics["train/loss"]) == pytest.approx(
        float(large_trainer.callback_metrics["train/loss"]), rel=1e-5)


def test_steps_schedules_loggers_and_progress_count_optimizer_steps(compose_cfg, tmp_path):
    """120 samples in batches of 16 (8 a epoch, the last of 8 samples), accumulated 3 by 3: windows of 3, 3, 2."""
    cfg = compose_cfg(*SMALL, "dataset.batch_size=16", "trainer.max_epochs=2", "trainer.accumulate_grad_batches=3",
                      "scheduler=step", "scheduler.interval=step", "scheduler.step_size=1", "scheduler.gamma=0.5",
                      "callbacks.progress_bar=true", "logger=[csv,tensorboard]")
    reader = reads_progress_bar()
    trainer, module = _fit(cfg, reader, run_dir=RunDir(tmp_path))
    assert trainer.global_step == 2 * 3
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**6)
    assert reader.seen == [(3, 3), (3, 3)]
    board = EventAccumulator(str(tmp_path / "tensorboard"))  # metrics.csv's rows are epochs, without steps
    board.Reload()
    for key in ("train/loss", "val/loss"):  # each epoch's row at its last optimizer step
        assert [event.step for event in board.Scalars(key)] == [2, 5], key


def test_accumulated_run_reports_the_global_batch(run_dlrun):
    result = run_dlrun("dataset.n_train=128", "dataset.batch_size=16", "trainer.accumulate_grad_batches=4",
                       "trainer.max_epochs=2", "callbacks=no_early_stopping", "logger=csv")
    summary = result.summary()
    assert summary["global_batch_size"] == 64 and summary["global_step"] == 2 * 2


@pytest.mark.slow
def test_ddp_run_with_accumulation_completes(run_dlrun):
    """2 processes (gloo), 64 samples each in batches of 8, accumulated 3 by 3: windows 3, 3, 2."""
    result = run_dlrun("hardware=ddp_cpu", "dataset.n_train=128", "dataset.batch_size=8",
                       "trainer.accumulate_grad_batches=3", "trainer.max_epochs=2", "callbacks=no_early_stopping")
    summary = result.summary()
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["global_step"] == 2 * 3 and summary["global_batch_size"] == 8 * 2 * 3


# DDP in one process (devices=1), in a fresh interpreter: its process group must not outlive the run.
COUNT_ALL_REDUCES = """
import sys, tempfile, torch, pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from dlrun import CONF_DIR
from dlrun.run import build_experiment, build_trainer
from dlrun.rundir import RunDir

class CountAllReduces(pl.Callback):
    calls = 0
    def on_train_start(self, trainer, pl_module):
        def hook(state, bucket):
            CountAllReduces.calls += 1
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future
        trainer.strategy.model.register_comm_hook(None, hook)

with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("config", overrides=["hardware=ddp_cpu", "hardware.devices=1", "dataset.n_train=128",
        "dataset.batch_size=16", "model.width=16", "model.depth=1", "trainer.max_epochs=2", "callbacks=no_early_stopping",
        "callbacks.progress_bar=false", f"trainer.accumulate_grad_batches={sys.argv[1]}"])
datamodule, _, module = build_experiment(cfg, {})
trainer, _, _ = build_trainer(cfg, RunDir(tempfile.mkdtemp()), {}, extra_callbacks=[CountAllReduces()])
trainer.fit(module, datamodule=datamodule)
print("all-reduces", CountAllReduces.calls, "steps", trainer.global_step)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("k", "steps"), [(1, 2 * 8), (3, 2 * 3)])
def test_ddp_all_reduces_once_per_optimizer_step(k, steps, tmp_path):
    """Under DDP only the last backward of an accumulation window all-reduces (grouping's _sync_gradients):
    8 batches an epoch, windows of 3, 3, 2 with k = 3. The flag it sets is torch's DDP's."""
    proc = subprocess.run([sys.executable, "-c", COUNT_ALL_REDUCES, str(k)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"all-reduces {steps} steps {steps}" in proc.stdout, proc.stdout + proc.stderr


# --- Lightning's private API: each use, checked by name -------------------------------------------
def _lightning_changed(what: str, user: str) -> str:
    return (f"pytorch_lightning {pl.__version__} changed {what}, which dlrun/training/grouping.py's {user} "
            "relies on: adapt it there")


def test_private_optimizer_bookkeeping_counts_global_step(compose_cfg, tmp_path):
    """Direct steps call LightningOptimizer._on_before_step/_on_after_step around the step: Lightning's
    manual-optimization loop patches them to count trainer.global_step."""
    cfg = compose_cfg(*SMALL, "dataset.batch_size=32", "trainer.max_epochs=1", "trainer.steps_per_execution=1")
    trainer, module = _fit(cfg, run_dir=RunDir(tmp_path))
    optimizer = module.optimizers()
    assert isinstance(optimizer, LightningOptimizer)
    for hook in ("_on_before_step", "_on_after_step"):
        assert callable(getattr(optimizer, hook, None)), _lightning_changed(f"LightningOptimizer.{hook}", "step")
    execution = next(c for c in trainer.callbacks if isinstance(c, GroupedExecution))
    assert execution.direct_steps
    assert trainer.global_step == 4, _lightning_changed("what _on_before_step/_on_after_step count", "step")


def test_private_logged_step_count(compose_cfg, tmp_path):
    """count_logged_steps writes fit_loop.epoch_loop._batches_that_stepped, which loggers read as the step
    and checkpoints keep."""
    cfg = compose_cfg(*SMALL, "dataset.batch_size=32", "trainer.max_epochs=1")
    trainer, _ = _fit(cfg, run_dir=RunDir(tmp_path))
    loop = trainer.fit_loop.epoch_loop
    assert isinstance(getattr(loop, "_batches_that_stepped", None), int), _lightning_changed(
        "fit_loop.epoch_loop._batches_that_stepped", "count_logged_steps")
    assert loop._batches_that_stepped == 4, _lightning_changed("how _batches_that_stepped counts", "count_logged_steps")
    assert loop.state_dict().get("state_dict", {}).get("_batches_that_stepped") == 4, _lightning_changed(
        "the checkpointed _batches_that_stepped", "count_logged_steps")


def test_private_loop_progress_resets(compose_cfg, tmp_path):
    """restart_epoch_progress (ResumeCheckpoint) resets the epoch loop's per-epoch progress by name."""
    cfg = compose_cfg(*SMALL, "dataset.batch_size=32", "trainer.max_epochs=1")
    trainer, _ = _fit(cfg, run_dir=RunDir(tmp_path))
    loop = trainer.fit_loop.epoch_loop
    for path in ("batch_progress", "scheduler_progress", "automatic_optimization.optim_progress",
                 "manual_optimization.optim_step_progress", "val_loop.batch_progress"):
        progress = loop
        for name in path.split("."):
            progress = getattr(progress, name, None)
        assert callable(getattr(progress, "reset_on_run", None)), _lightning_changed(
            f"fit_loop.epoch_loop.{path}.reset_on_run", "restart_epoch_progress")
    assert loop.batch_progress.current.completed > 0 and loop.val_loop.batch_progress.total.completed > 0
    restart_epoch_progress(trainer)
    assert loop.batch_progress.current.completed == 0, _lightning_changed("reset_on_run", "restart_epoch_progress")
    assert loop.val_loop.batch_progress.total.completed == 0
    assert loop.manual_optimization.optim_step_progress.total.completed == 4  # global_step survives


def test_experiment_trains_without_grouping_under_a_plain_trainer(compose_cfg):
    """A Trainer not built by build_trainer (no GroupedExecution): one batch per call, a step per batch."""
    cfg = compose_cfg(*SMALL, "dataset.batch_size=32")
    datamodule, _, module = build_experiment(cfg, {})
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 4
    assert OmegaConf.select(cfg, "trainer.accumulate_grad_batches") == 1
