"""`trajectory.png`: the path a two-weight network's weights take over the contours of its training loss,
the notes' pictures of gradient descent on the ravine (004 §6.2.2, Figs. 94-97: a small learning rate
crawls, a large one zig-zags or diverges, momentum cuts through).

`WeightTrajectory` (the callbacks group's `trajectory` entry) acts only on a network whose weights, biases
aside, are exactly two numbers (`experiment=ravine`'s linear model: y = w1 x1 + w2 x2 + b): it records them
before training and after every optimizer step (a torch step hook: two numbers copied on the device, no
host sync), and when training ends, also by divergence, writes `trajectory.csv` (step, w1, w2) and draws
the path over the data loss on a grid of (w1, w2), the other parameters (the bias) at their final values.
A resumed run draws the steps since it resumed. Every other network costs nothing.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.func import functional_call

from dlrun.rundir import RunDir, write_atomic

TRAJECTORY_FILE = "trajectory.png"
TRAJECTORY_CSV = "trajectory.csv"
GRID = 60  # contour grid points per axis
GRID_SAMPLES = 4096  # training samples the contours' loss is measured on (the ravine's 256: all of them)


def two_weights(network: nn.Module) -> list[tuple[str, nn.Parameter]] | None:
    """The network's trainable weight tensors (biases, 1-d, aside) when they hold exactly two numbers."""
    weights = [(name, p) for name, p in network.named_parameters() if p.requires_grad and p.dim() >= 2]
    return weights if sum(p.numel() for _, p in weights) == 2 else None


class WeightTrajectory(Callback):
    """Records a two-weight network's weights at every optimizer step; draws `trajectory.png` at the end."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self._weights: list[tuple[str, nn.Parameter]] = []
        self._path: list[torch.Tensor] = []
        self._handles: list = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = two_weights(pl_module.network)
        if weights is None or not trainer.is_global_zero:  # DDP ranks hold the same weights: rank 0 records
            return
        self._weights = weights
        self._path = [self._current()]
        self._handles = [optimizer.register_step_post_hook(self._record) for optimizer in trainer.optimizers]

    def _current(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for _, p in self._weights]).clone()

    def _record(self, optimizer, args, kwargs) -> None:
        self._path.append(self._current())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._write(trainer, pl_module)  # a diverged run's path is the picture of its learning rate

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if not self._path:
            return
        path = torch.stack(self._path).double().cpu().numpy()
        self._path = []
        names = [f"{name}[{', '.join(map(str, idx))}]" for name, p in self._weights for idx in np.ndindex(*p.shape)]
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(["step", *names])
        writer.writerows([step, *weights] for step, weights in enumerate(path.tolist()))
        write_atomic(self.run_dir.path / TRAJECTORY_CSV, table.getvalue())
        finite = path[np.isfinite(path).all(axis=1) & (np.abs(path) < 1e6).all(axis=1)]
        grid = _loss_grid(pl_module, trainer, self._weights, finite) if len(finite) else None
        write_atomic(self.run_dir.path / TRAJECTORY_FILE, draw(path, names, grid))


@torch.no_grad()
def _loss_grid(module: pl.LightningModule, trainer: pl.Trainer, weights: list[tuple[str, nn.Parameter]],
               path: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(w1 values, w2 values, data loss at each): the training loss around the path, other parameters fixed."""
    datamodule = trainer.datamodule
    if datamodule is None:
        return None
    device = next(module.network.parameters()).device
    xs, ys, seen = [], [], 0
    for x, y in datamodule.eval_loader("train"):
        xs.append(x.to(device))
        ys.append(y.to(device))
        seen += len(x)
        if seen >= GRID_SAMPLES:
            break
    if not xs:
        return None
    x, y = torch.cat(xs)[:GRID_SAMPLES], torch.cat(ys)[:GRID_SAMPLES]
    axes = []
    for lo, hi in zip(path.min(axis=0), path.max(axis=0), strict=True):
        margin = 0.2 * (hi - lo) if hi > lo else max(1.0, abs(lo))
        axes.append(np.linspace(lo - margin, hi + margin, GRID))
    network, task = module.network, module.task
    training = network.training
    network.eval()
    losses = np.empty((GRID, GRID))
    try:
        for i, w2 in enumerate(axes[1]):
            for j, w1 in enumerate(axes[0]):
                flat = torch.tensor([w1, w2], dtype=weights[0][1].dtype, device=device)
                params, start = {}, 0
                for name, p in weights:
                    params[name] = flat[start:start + p.numel()].reshape(p.shape)
                    start += p.numel()
                losses[i, j] = float(task.loss(functional_call(network, params, (x,)), y))
    finally:
        network.train(training)
    return axes[0], axes[1], losses


def draw(path: np.ndarray, names: list[str], grid: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> bytes:
    """The PNG's bytes: the loss contours (log-spaced levels) and the path, its start and end marked."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.8))
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.88)
    ax = fig.add_subplot(1, 1, 1)
    if grid is not None:
        # Log-spaced levels of the loss above its minimum on the grid: the constant the other parameters
        # add (the bias's share) would otherwise squeeze every level into a thin band.
        w1, w2, loss = grid
        excess = loss - np.nanmin(loss)
        top = np.nanmax(excess)
        if np.isfinite(top) and top > 0:
            levels = np.geomspace(top * 1e-4, top, 14)
            ax.contour(w1, w2, np.clip(excess, levels[0], None), levels=levels, cmap="viridis",
                       norm=LogNorm(levels[0], top), linewidths=0.8)
    shown = path[np.isfinite(path).all(axis=1) & (np.abs(path) < 1e6).all(axis=1)]
    ax.plot(shown[:, 0], shown[:, 1], "-o", color="tab:red", markersize=2.5, linewidth=1.0, label="path")
    if len(shown):
        ax.plot(*shown[0], "s", color="black", markersize=6, label="start")
        ax.plot(*shown[-1], "*", color="tab:red", markersize=11, label="end")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.grid(alpha=0.2)
    ax.legend(fontsize="small", loc="best")
    steps = len(path) - 1
    end = f"end ({_fmt(path[-1, 0])}, {_fmt(path[-1, 1])})"
    ax.set_title(f"weights over {steps} optimizer steps · {end}\ncontours: training loss above its minimum "
                 "(log-spaced levels)", fontsize="medium")
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=90)
    return image.getvalue()


def _fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)
