"""One experiment, several processes: DDP ranks that share one run directory, in a single run or a sweep job.

Lightning's `ddp` strategy starts ranks 1..N-1 of a node by running the current command line again
(`_SubprocessScriptLauncher`); under Hydra it appends `hydra.run.dir=<HydraConfig run.dir>`. That is
right for a single `dlrun` run and wrong for a sweep job: `run.dir` is not the job's directory, and
the command line holds `-m` and the sweep's comma lists, so each child would run the whole sweep
again in new directories. `children_join_this_run` therefore gives the children, for the length of
fit and test, this job's own command line (`dlrun.command_line.rank_command`: its overrides, in RUN
mode, without a log file) and this job's directory as `run.dir`. Ranks > 0 then compose the same config, join the process group, and
write nothing: rank 0 alone writes config, metrics, checkpoints, log and summary.

We use `ddp` rather than `ddp_spawn`: the main process stays rank 0, so the run directory, the
monitor tracker and the summary live where the run started; the in-memory data is built in each
process rather than pickled to it; and SLURM's one-task-per-device launch is the same code path.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, read_write
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from dlrun.command_line import rank_command

# Set by Lightning's launcher in the main process for its children; cleared after the job so that a
# later job in the same process (Hydra's basic launcher) starts its own children again.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def is_rank_zero() -> bool:
    """True in the process that owns the run directory (decided from the environment before a Trainer exists)."""
    return rank_zero_only.rank == 0


def keep_log_to_rank_zero() -> None:
    """Ranks started by the cluster (SLURM's tasks, torchrun) set up Hydra's job logging too, on the run's
    own dlrun.log: on ranks > 0, close it again so that the log is rank 0's alone."""
    if is_rank_zero():
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


@contextmanager
def children_join_this_run(trainer: pl.Trainer, hydra_cfg: DictConfig) -> Iterator[None]:
    """Around fit and test: DDP children started by this process run this job, in this job's directory."""
    launcher = getattr(trainer.strategy, "launcher", None)
    starts_children = (
        isinstance(launcher, _SubprocessScriptLauncher)
        and not trainer.strategy.cluster_environment.creates_processes_externally
    )
    if not starts_children:
        yield
        return
    saved_argv, saved_run_dir = sys.argv, hydra_cfg.run.dir
    saved_env = {key: os.environ.get(key) for key in _LAUNCH_ENV}
    sys.argv = rank_command(sys.argv, hydra_cfg)
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved_run_dir
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
