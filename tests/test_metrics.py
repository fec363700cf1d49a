"""Metrics declared once (dlrun/metrics.py) and accumulated by EpochMetrics (dlrun/training/metrics.py):
every declared name is computed, the declaration loads without torch, callbacks.monitor accepts what is
logged, and summary.json reports the best epoch's metrics beside the test metrics of its checkpoint."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from dlrun import metrics as declared
from dlrun.data.spec import DataSpec, Graph
from dlrun.training.metrics import EpochMetrics
from dlrun.training.tasks import make_task

SPECS = {
    "multiclass": DataSpec("toy", "multiclass", (4,), 3),
    "binary": DataSpec("toy", "binary", (4,), 1),
    "per_step": DataSpec("toy", "multiclass", (5, 4), 3, per_step=True),
    "regression": DataSpec("toy", "regression", (4,), 1),
    "node_classification": DataSpec("toy", "node_classification", (4,), 3, graph=Graph(5, np.zeros((2, 0)))),
    "reconstruction": DataSpec("toy", "reconstruction", (4,), 1),
    "generative": DataSpec("toy", "generative", (4,), 1),
}


def _network(spec: DataSpec) -> nn.Module:
    """A network with ReLUs that returns the task's output: logits, values, or an input task's Reconstructed."""
    from dlrun.models.autoencoder import VAE, Autoencoder

    if spec.task == "reconstruction":
        return Autoencoder(spec, latent_dim=2, width=8)
    if spec.task == "generative":
        return VAE(spec, latent_dim=2, width=8)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, spec.num_outputs))


def _batch(spec: DataSpec, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, *spec.input_shape, generator=g)
    if spec.task in ("reconstruction", "generative"):  # inputs in [0, 1], scored against themselves
        return x.sigmoid(), torch.zeros(n, dtype=torch.long)
    if spec.task == "regression":
        return x, torch.randn(n, generator=g)
    if spec.task == "binary":
        return x, torch.randint(0, 2, (n,), generator=g).float()
    if spec.task == "node_classification":  # the nodes of other splits: -1
        return x, torch.randint(0, spec.num_outputs, (n,), generator=g).index_fill_(0, torch.tensor([1]), -1)
    return x, torch.randint(0, spec.num_outputs, (n, spec.input_shape[0]) if spec.per_step else (n,), generator=g)


@pytest.mark.parametrize("kind", list(SPECS))
def test_every_declared_metric_is_computed_and_nothing_else(kind):
    """An epoch of each stage, through EpochMetrics' public interface, with a penalty, gradients and ReLUs:
    the names computed are exactly those declared for the task and stage."""
    spec = SPECS[kind]
    task = make_task(spec)
    assert task.kind == kind
    network = _network(spec)
    metrics = EpochMetrics(task, network)
    g = torch.Generator().manual_seed(0)
    for stage in declared.STAGES:
        if stage != "train":
            metrics.start_evaluation()
        for n in (5, 3):
            x, y = _batch(spec, n, g)
            loss = metrics.score(network(x), task.target(x, y), stage)
            if stage == "train":
                metrics.add_penalty(loss.detach() * 0.1)
                loss.backward()
                metrics.add_gradient_norms(list(network.parameters()))
                metrics.flush("train")
        logged = metrics.compute(stage)
        assert set(logged) == {f"{stage}/{m.name}" for m in declared.stage_metrics(kind, stage)}, stage
        assert all(isinstance(v, float) for v in logged.values())
        assert metrics.compute(stage) == {}  # a fresh epoch


def test_declaration_loads_without_torch():
    code = "import dlrun.sweep.summary, dlrun.metrics, dlrun.console, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_sweep_headline_columns_follow_the_declaration():
    from dlrun.sweep.summary import headline_test_keys

    def row(*names):
        return {"test": dict.fromkeys(names, 0.5)}

    assert headline_test_keys([row("test/loss", "test/acc", "test/f1")], "val/loss") == ["test/loss", "test/acc"]
    assert headline_test_keys([row("test/loss", "test/acc", "test/bpc")], "val/acc") == ["test/acc", "test/bpc"]
    assert headline_test_keys([row("test/loss", "test/mae", "test/r2")], "val/mae") == ["test/mae", "test/r2"]
    assert headline_test_keys([row("test/loss", "test/recon", "test/kl", "test/bpd")], "val/loss") == [
        "test/loss", "test/bpd"]
    assert headline_test_keys([row("test/loss", "test/recon")], "val/loss") == ["test/loss", "test/recon"]


FAST = ["print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false",
        "dataset.n_train=400"]


def _rows(run_dir) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def test_monitor_dead_relu_follows_the_network(run_dlrun):
    """A network with nn.ReLU modules logs val/dead_relu, so it may be monitored; one without refuses it,
    listing what it logs."""
    result = run_dlrun(*FAST, "callbacks.monitor=val/dead_relu", "callbacks.mode=min", "trainer.max_epochs=2")
    summary = result.summary()
    rows = _rows(result.run_dir)
    assert summary["status"] == "completed" and summary["monitor"] == "val/dead_relu"
    assert summary["best_value"] == min(float(r["val/dead_relu"]) for r in rows)
    assert "test/dead_relu" in summary["metrics"]

    refused = run_dlrun(*FAST, "model.activation=tanh", "callbacks.monitor=val/dead_relu", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    message = " ".join(refused.stderr.split())
    assert "'val/dead_relu' is not a metric" in message and "val/loss" in message and "val/acc" in message


def test_summary_reports_the_best_epochs_metrics_beside_its_test(run_dlrun):
    """An early-stopped run: summary.json's train/val metrics are metrics.csv's row at best_epoch (the model
    best.ckpt holds, which test/* measures); last_epoch holds the last row."""
    result = run_dlrun(*FAST, "optim.lr=0.05", "callbacks.early_stopping.patience=2", "trainer.max_epochs=40")
    summary = result.summary()
    rows = _rows(result.run_dir)
    best, last = rows[summary["best_epoch"]], rows[-1]
    assert summary["epochs"] < 40 and summary["best_epoch"] < len(rows) - 1  # stopped early, after the best
    assert summary["metrics"]["val/loss"] == float(best["val/loss"]) == summary["best_value"]
    reported = {k: v for k, v in summary["metrics"].items() if not k.startswith("test/")}
    assert reported == {k: float(v) for k, v in best.items() if k != "epoch" and v != ""}
    assert summary["last_epoch"]["epoch"] == int(last["epoch"]) == len(rows) - 1
    assert summary["last_epoch"]["metrics"] == {k: float(v) for k, v in last.items() if k != "epoch" and v != ""}
    assert {"test/loss", "test/acc"} <= set(summary["metrics"])
    assert f"best epoch ({summary['best_epoch']})" in result.stdout and f"last epoch ({len(rows) - 1})" in result.stdout
