"""`dlrun-info`: what dlrun sees on this machine, on one screen (or as JSON with --json).

Versions (dlrun, Python, torch and the CUDA, cuDNN and NCCL it was built with, Lightning), the devices
torch sees, the cluster variables Lightning reads to place DDP ranks (SLURM, torchrun), the W&B mode a
run would use, and the config, output and data directories. Overrides compose as for `dlrun`:
`dlrun-info logger=wandb paths.output_dir=/scratch/me` shows what that run would use.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any

# What Lightning's SLURMEnvironment and TorchElasticEnvironment read, and which devices CUDA shows.
CLUSTER_VARIABLES = (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NODELIST",
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID",
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID",
    "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES",
)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nccl_version(cuda) -> str | None:
    """NCCL's version as torch reports it; None for a torch built without NCCL (CPU, macOS)."""
    try:
        version = cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _cudnn_version(cudnn) -> str | None:
    """cuDNN 9's version number 92400 as 9.24.0."""
    if not cudnn.is_available():
        return None
    number = cudnn.version()
    return f"{number // 10000}.{number % 10000 // 100}.{number % 100}"


def _gpus(cuda) -> list[dict[str, Any]]:
    if not cuda.is_available():
        return []
    gpus = []
    for index in range(cuda.device_count()):
        props = cuda.get_device_properties(index)
        gpus.append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}"})
    return gpus


def _cluster(env: dict[str, str]) -> str:
    """The environment Lightning would detect: it starts no processes of its own under SLURM or torchrun."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return "torchrun (TorchElasticEnvironment)"
    with warnings.catch_warnings():  # "srun is available but not used": this is not a run
        warnings.simplefilter("ignore")
        slurm = SLURMEnvironment.detect()
    if slurm:
        interactive = env.get("SLURM_JOB_NAME") in ("bash", "interactive")
        return "SLURM, interactive: Lightning starts the ranks" if interactive else "SLURM (SLURMEnvironment)"
    return "none: Lightning starts the DDP ranks itself"


def collect(overrides: list[str], cuda=None, mps=None) -> dict[str, Any]:
    """Everything `dlrun-info` shows. `cuda` and `mps` are torch.cuda and torch.backends.mps unless given
    (a test passes stand-ins with the answers of a GPU machine)."""
    import pytorch_lightning
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dlrun import CONF_DIR
    from dlrun.tracking import resolve_mode

    cuda = torch.cuda if cuda is None else cuda
    mps = torch.backends.mps if mps is None else mps
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    wandb_in_use = "wandb" in cfg.logger
    env = dict(os.environ)
    return {
        "versions": {
            "dlrun": _version("dlrun"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": _cudnn_version(torch.backends.cudnn),
            "nccl": _nccl_version(cuda),
            "lightning": pytorch_lightning.__version__,
        },
        "devices": {
            "cpus": os.cpu_count(),
            "gpus": _gpus(cuda),
            "mps": bool(mps.is_available()),
        },
        "cluster": {
            "detected": _cluster(env),
            "variables": {name: env[name] for name in CLUSTER_VARIABLES if name in env},
        },
        "wandb": {
            "in_use": wandb_in_use,
            "mode": resolve_mode(cfg.logger.wandb.mode if wandb_in_use else None),
        },
        "directories": {
            "config": str(CONF_DIR),
            "output": str(Path(cfg.paths.output_dir).absolute()),
            "data": str(Path(cfg.paths.data_dir).absolute()),
        },
    }


def render(info: dict[str, Any]) -> None:
    from rich.table import Table

    from dlrun.console import console

    table = Table(title="dlrun-info", show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold cyan")
    table.add_column()
    versions = info["versions"]
    table.add_row("versions", "  ".join(f"{name} {value or '-'}" for name, value in versions.items()))
    devices = info["devices"]
    gpus = [f"cuda:{g['index']} {g['name']} ({g['memory_gib']} GiB, sm {g['capability']})" for g in devices["gpus"]]
    table.add_row("GPUs", "\n".join(gpus) or "none (torch sees no CUDA device)")
    table.add_row("MPS", "available" if devices["mps"] else "no")
    table.add_row("CPUs", str(devices["cpus"]))
    cluster = info["cluster"]
    table.add_row("cluster", cluster["detected"])
    table.add_row("", "\n".join(f"{k}={v}" for k, v in cluster["variables"].items()) or "(no SLURM or torchrun variables)")
    wandb = info["wandb"]
    table.add_row("W&B", wandb["mode"] + ("" if wandb["in_use"] else "  (with logger=wandb; the config logs to CSV only)"))
    for name, path in info["directories"].items():
        table.add_row(f"{name} dir", path)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dlrun-info", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as for dlrun (e.g. logger=wandb)")
    parser.add_argument("--json", action="store_true", help="print the same as one JSON object")
    args = parser.parse_args(argv)
    from dlrun.error_boundary import boundary  # a bad override: the same panel as dlrun's

    with boundary():
        info = collect(args.overrides)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        render(info)


if __name__ == "__main__":
    main()
