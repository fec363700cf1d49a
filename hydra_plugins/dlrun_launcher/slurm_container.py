"""hydra/launcher=slurm with `container=<image>`: each SLURM task runs dlrun inside that image.

hydra-submitit-launcher submits every job with sbatch; each task then runs
`<python> -u -m submitit.core._submit <folder>`, where <python> is submitit's documented `python`
option ("this allows to use singularity for example"). With `container` set, that <python> becomes the
container runtime running the image's Python, so the job's code, libraries and CUDA come from the image
while the sweep directory, dlrun's output root and the data directory are mounted at the same paths
(the pickled job and its results pass through them), and the config directories read-only (the job
composes its config again from them). The runtime is started once per task on its node:

    podman/docker  run --rm --network=host --user=<uid>:<gid>, the task's SLURM_*/SUBMITIT_* variables passed
    apptainer      exec (the host environment, SLURM's variables included, passes by default)

`container_options` adds runtime options, e.g. [--nv] (Apptainer) or [--gpus=all] (Docker) for GPUs.

The same settings submit a sweep's workers (`sweep.workers`, `submit_workers`: one task each, which
runs its trials itself), watched with squeue and cancelled with scancel by the submitting process.
"""

import contextlib
import functools
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional  # noqa: UP035  OmegaConf's schema types

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

RUNTIMES = ("podman", "docker", "apptainer")
IMAGE_PYTHON = "/opt/dlrun/bin/python"  # the Dockerfile's virtual environment
# What each task must see inside podman/docker: SLURM's placement (Lightning's ranks), submitit's job
# identity, DDP's rendezvous, the GPUs SLURM gave the task, W&B's settings.
PASSED_VARIABLES = "^((SLURM|SUBMITIT|WANDB)_[A-Za-z0-9_]*|MASTER_ADDR|MASTER_PORT|CUDA_VISIBLE_DEVICES)="
CANCEL_GRACE_SECONDS = 60  # cancelled workers' running jobs save their last checkpoint meanwhile


# Hydra imports plugin modules without registering them in sys.modules: no `from __future__ import
# annotations` here (dataclasses would look the module up), and typing's Optional/List for OmegaConf.
@dataclass
class ContainerSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.dlrun_launcher.slurm_container.ContainerSlurmLauncher"
    # an image: a podman/docker name, or an Apptainer .sif path; None: the host's Python, no container
    container: Optional[str] = None  # noqa: UP045
    container_runtime: str = "podman"  # podman, docker or apptainer
    container_options: List[str] = field(default_factory=list)  # noqa: UP006


ConfigStore.instance().store(group="hydra/launcher", name="dlrun_slurm", node=ContainerSlurmQueueConf,
                             provider="dlrun")


def container_command(runtime: str, image: str, mounts: list[Path], read_only: list[Path],
                      env: dict[str, str], options: list[str]) -> str:
    """The shell words submitit runs in place of `python` in each task: `sh -c '<runtime> ... "$@"'`, so
    that the task's own variables (SLURM_PROCID differs per task) are read on its node."""
    if runtime not in RUNTIMES:
        from dlrun.errors import UserError

        raise UserError(f"hydra.launcher.container_runtime={runtime} is not one of {', '.join(RUNTIMES)}.",
                        "Pick podman, docker or apptainer.", title="Unknown container runtime")
    mount = "--bind" if runtime == "apptainer" else "--volume"
    common = [*(f"{mount}={p}:{p}" for p in mounts), *(f"{mount}={p}:{p}:ro" for p in read_only),
              *(f"--env={k}={v}" for k, v in env.items()), *options]
    if runtime == "apptainer":
        script = shlex.join(["apptainer", "exec", *common, image, IMAGE_PYTHON])
    else:
        passed = f"$(env | grep -oE {shlex.quote(PASSED_VARIABLES)} | sed 's/^/--env=/; s/=$//')"
        script = " ".join([shlex.join([runtime, "run", "--rm", "--network=host", f"--user={os.getuid()}:{os.getgid()}",
                                       *common, f"--entrypoint={IMAGE_PYTHON}"]), passed, shlex.quote(image)])
    script = f'exec {script} "$@"'
    return f"sh -c {shlex.quote(script)} dlrun-container"


def still_queued(jobs: list) -> bool:
    """Whether any of submitit's `jobs` has not ended: no result file yet, and squeue still lists it. (submitit
    itself asks sacct, which a cluster without accounting does not answer: it would wait for ever.)"""
    waiting = [job for job in jobs if not job.paths.result_pickle.exists()]
    if not waiting:
        return False
    listed = subprocess.run(["squeue", "--noheader", "--format=%i", "--jobs=" + ",".join(j.job_id for j in waiting)],
                            capture_output=True, text=True)
    return listed.returncode == 0 and bool(listed.stdout.strip())  # an error: none of them is known any more


def cancel(jobs: list, grace: float = CANCEL_GRACE_SECONDS) -> None:
    """scancel submitit's `jobs`, and wait (at most `grace` seconds) until they have left the queue."""
    for job in jobs:
        job.cancel(check=False)
    deadline = time.time() + grace
    while time.time() < deadline and still_queued(jobs):
        time.sleep(1)


def failure(job) -> Optional[str]:  # noqa: UP045
    """Why an ended submitit job failed (the last line of its error), or None if it returned."""
    if not job.paths.result_pickle.exists():
        return "ended without a result (cancelled, killed, past its time limit, or its node failed)"
    error = job.exception()
    return None if error is None else (str(error).strip().splitlines() or [type(error).__name__])[-1]


@contextlib.contextmanager
def _submitit_python(python: str):
    """hydra-submitit-launcher builds its AutoExecutor inside `launch`: hand it submitit's `python`."""
    import submitit

    original = submitit.AutoExecutor
    submitit.AutoExecutor = functools.partial(original, slurm_python=python)
    try:
        yield
    finally:
        submitit.AutoExecutor = original


class ContainerSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SlurmLauncher; with `container` set, every task runs in that image."""

    def __init__(self, container: str | None = None, container_runtime: str = "podman",
                 container_options: list[str] | None = None, **params) -> None:
        super().__init__(**params)
        self.container, self.container_runtime = container, container_runtime
        self.container_options = list(container_options or [])

    def launch(self, job_overrides, initial_job_idx):
        python = self._container_python()
        with _submitit_python(python) if python else contextlib.nullcontext():
            return super().launch(job_overrides, initial_job_idx)

    def submit_workers(self, work: Callable[[int], Any], count: int) -> list:
        """`count` SLURM jobs running work(0), ..., work(count - 1): this launcher's partition, time limit,
        resources, sbatch options and container, but one task on one node each (a sweep's workers,
        sweep.workers, which start their trials' processes themselves). Returns submitit's jobs."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        params = {**self.params, "nodes": 1, "tasks_per_node": 1}
        folder, max_num_timeout = params.pop("submitit_folder"), params.pop("max_num_timeout")
        python = self._container_python()
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_num_timeout,
                                         **({"slurm_python": python} if python else {}))
        common = set(OmegaConf.structured(BaseQueueConf).keys())  # as hydra-submitit-launcher names them
        executor.update_parameters(**{k if k in common else f"slurm_{k}": v for k, v in params.items()})
        with executor.batch():
            jobs = [executor.submit(work, worker) for worker in range(count)]
        return jobs

    def _container_python(self) -> Optional[str]:  # noqa: UP045
        """What submitit runs in place of `python` with `container` set (see container_command); else None."""
        if not self.container:
            return None
        paths = self.config.paths
        output_root, data_dir = Path(str(paths.output_dir)).absolute(), Path(str(paths.data_dir)).absolute()
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        for path in (sweep_dir, output_root, data_dir):
            path.mkdir(parents=True, exist_ok=True)  # a runtime refuses to mount what does not exist
        writable = sorted({sweep_dir, output_root, data_dir})
        writable = [p for p in writable if not any(p != q and p.is_relative_to(q) for q in writable)]
        # the job composes its config again, from the same sources: dlrun's conf/ and any hydra.searchpath
        config_dirs = sorted({Path(s.path) for s in self.hydra_context.config_loader.get_sources()
                              if s.scheme() == "file"} - set(writable))
        # paths.* resolve again inside the job: to the same host paths, not the image's /outputs and /data
        env = {"DLRUN_OUTPUT_DIR": str(output_root), "DLRUN_DATA_DIR": str(data_dir)}
        return container_command(self.container_runtime, self.container, writable, config_dirs, env,
                                 self.container_options)
