"""`dlrun-info`: versions, devices, cluster variables, W&B mode and directories, on this machine and, with
torch.cuda's answers standing in for a GPU node's, as a two-GPU machine would show them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytorch_lightning
import torch

from dlrun import CONF_DIR
from dlrun.info import collect, render


class TwoGPUs:
    """torch.cuda's answers on a node with two 80 GiB H100s (the fields dlrun-info reads)."""

    nccl = SimpleNamespace(version=lambda: (2, 21, 5))

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 2

    @staticmethod
    def get_device_properties(index: int) -> SimpleNamespace:
        return SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9, minor=0)


def test_info_on_this_machine_as_json(tmp_path):
    env = {**os.environ, "DLRUN_OUTPUT_DIR": str(tmp_path / "out"), "SLURM_JOB_ID": "42", "SLURM_NTASKS": "2",
           "SLURM_JOB_NAME": "train", "SLURM_PROCID": "1", "WANDB_MODE": "disabled"}
    env.pop("DLRUN_DATA_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "dlrun.info", "--json", "logger=wandb"], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["lightning"] == pytorch_lightning.__version__
    assert info["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["devices"]["cpus"] == os.cpu_count()
    assert len(info["devices"]["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert info["cluster"]["variables"] == {"SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "train",
                                            "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    assert info["cluster"]["detected"].startswith("SLURM")
    assert info["wandb"] == {"in_use": True, "mode": "disabled"}
    assert info["directories"] == {"config": str(CONF_DIR), "output": str(tmp_path / "out"),
                                   "data": str(tmp_path / "data")}


def test_info_shows_a_gpu_nodes_devices(monkeypatch, capsys):
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK",
                 "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    info = collect(["logger=csv"], cuda=TwoGPUs, mps=SimpleNamespace(is_available=lambda: False))
    assert info["devices"]["gpus"] == [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 80.0, "capability": "9.0"},
        {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 80.0, "capability": "9.0"},
    ]
    assert info["versions"]["nccl"] == "2.21.5"
    assert info["cluster"] == {"detected": "none: Lightning starts the DDP ranks itself",
                               "variables": {"CUDA_VISIBLE_DEVICES": "2,3"}}
    assert info["wandb"]["in_use"] is False
    render(info)
    screen = capsys.readouterr().out
    assert "cuda:1 NVIDIA H100 80GB HBM3 (80.0 GiB, sm 9.0)" in screen
    assert "CUDA_VISIBLE_DEVICES=2,3" in screen


def test_info_names_a_bad_override():
    proc = subprocess.run([sys.executable, "-m", "dlrun.info", "model=nope"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "Unknown option" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
