"""Pictures of what a model of the inputs makes: samples.png, reconstructions.png and latent.png.

A network takes part through the methods it has (dlrun/models/autoencoder.py; a GAN's generator the same):

    sample(n, generator) -> (n, *input shape) in [0, 1]   samples.png: a generative model's draws
    reconstruct(x)       -> x's shape, in [0, 1]           reconstructions.png: inputs above their reconstructions
    encode(x)            -> (n, k)                         latent.png when k = 2: test points coloured by class

samples.png and reconstructions.png are drawn for image data, latent.png for any data with classes. The
`Pictures` callback redraws them in the run directory at the end of every validation and after testing
(the model of best.ckpt), and sends each to the W&B and TensorBoard loggers when those are on. Samples
come from fixed draws (a generator seeded with the run's seed), so that successive pictures show the model
change, not the noise, and drawing them takes nothing from the training's random state.

matplotlib's Figure and image writer, never pyplot: no display, no global state. Files are written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from dlrun.data.spec import DataSpec
from dlrun.rundir import write_atomic

SAMPLES_FILE = "samples.png"
RECONSTRUCTIONS_FILE = "reconstructions.png"
LATENT_FILE = "latent.png"
GRID = 8  # samples.png: an 8 x 8 grid; reconstructions.png: 2 rows of 8 pairs (inputs above their reconstructions)
LATENT_POINTS = 2000  # test points in latent.png
MIN_CELL_PIXELS = 48  # small images (8 x 8 digits) are enlarged, pixels kept square


def pictures_for(network: torch.nn.Module, spec: DataSpec, run_dir: Path, seed: int) -> list[pl.Callback]:
    """A Pictures callback when the network can draw something for this data; none otherwise."""
    pictures = Pictures(run_dir, spec, seed)
    return [pictures] if pictures.kinds(network) else []


class Pictures(pl.Callback):
    """Draws the pictures the network can make, at each validation's end and after testing (rank 0 only)."""

    def __init__(self, run_dir: Path, spec: DataSpec, seed: int = 0):
        self.run_dir = Path(run_dir)
        self.spec = spec
        self.seed = seed

    def kinds(self, network: torch.nn.Module) -> list[str]:
        """The files this network draws for this data."""
        image = self.spec.kind == "image"
        found = []
        if image and callable(getattr(network, "sample", None)):
            found.append(SAMPLES_FILE)
        if image and callable(getattr(network, "reconstruct", None)):
            found.append(RECONSTRUCTIONS_FILE)
        if callable(getattr(network, "encode", None)) and len(self.spec.class_names) >= 2:
            found.append(LATENT_FILE)  # only when the code has 2 dimensions: known once encoded
        return found

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.draw(trainer, pl_module.network, step=trainer.current_epoch)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer, pl_module.network, step=trainer.current_epoch)

    def draw(self, trainer: pl.Trainer, network: torch.nn.Module, step: int) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        device = next(network.parameters()).device
        was_training = network.training
        network.eval()
        try:
            drawn: dict[str, np.ndarray] = {}
            kinds = self.kinds(network)
            if SAMPLES_FILE in kinds:
                generator = torch.Generator().manual_seed(self.seed)
                drawn[SAMPLES_FILE] = image_grid(network.sample(GRID * GRID, generator=generator).cpu(), GRID)
            if RECONSTRUCTIONS_FILE in kinds:
                x = datamodule.inputs("val", 2 * GRID)
                rebuilt = network.reconstruct(x.to(device)).cpu()
                drawn[RECONSTRUCTIONS_FILE] = image_grid(interleave_rows(x.clamp(0, 1), rebuilt, GRID), GRID)
            if LATENT_FILE in kinds:
                x = datamodule.inputs("test", LATENT_POINTS)
                codes = network.encode(x.to(device)).cpu()
                if codes.dim() == 2 and codes.shape[1] == 2:
                    drawn[LATENT_FILE] = latent_scatter(codes.numpy(), datamodule.labels("test", len(x)).numpy(),
                                                        self.spec.class_names)
        finally:
            network.train(was_training)
        for name, picture in drawn.items():
            write_atomic(self.run_dir / name, png_bytes(picture))
            send_to_loggers(trainer, f"pictures/{Path(name).stem}", picture, step)


def interleave_rows(inputs: torch.Tensor, outputs: torch.Tensor, columns: int) -> torch.Tensor:
    """Rows of `columns` inputs, each above the row of their reconstructions."""
    rows = []
    for start in range(0, len(inputs), columns):
        rows += [inputs[start : start + columns], outputs[start : start + columns]]
    return torch.cat(rows)


def image_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """(N, C, H, W) images in [0, 1] as one RGB uint8 picture, `columns` a row, a 1-pixel grey rule between
    them; grey images (C = 1) in grey, 3 channels as colour; small images enlarged to MIN_CELL_PIXELS."""
    images = images.detach().float().clamp(0, 1)
    n, channels, height, width = images.shape
    if channels not in (1, 3):  # another channel count: its mean, in grey
        images, channels = images.mean(1, keepdim=True), 1
    scale = max(1, math.ceil(MIN_CELL_PIXELS / max(height, width)))
    images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    height, width = height * scale, width * scale
    rows = math.ceil(n / columns)
    grid = np.full((rows * (height + 1) + 1, columns * (width + 1) + 1, 3), 0.5, dtype=np.float32)
    pixels = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        top, left = 1 + (i // columns) * (height + 1), 1 + (i % columns) * (width + 1)
        grid[top : top + height, left : left + width] = pixels[i]
    return (grid * 255).round().astype(np.uint8)


def latent_scatter(codes: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> np.ndarray:
    """A 2-D latent space as an RGB picture: each point a test input's code, coloured by its class."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5.0))
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = labels.astype(np.int64).reshape(-1)
    cmap = colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    for k, name in enumerate(class_names):
        chosen = labels == k
        if chosen.any():
            ax.scatter(codes[chosen, 0], codes[chosen, 1], s=6, alpha=0.7, color=cmap(k % cmap.N), label=name)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title("latent space of the test points (encoder means)")
    if len(class_names) <= 20:
        ax.legend(markerscale=2.5, fontsize=7, loc="best", title="class")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def png_bytes(picture: np.ndarray) -> bytes:
    from matplotlib.image import imsave

    buffer = io.BytesIO()
    imsave(buffer, picture, format="png")
    return buffer.getvalue()


def send_to_loggers(trainer: pl.Trainer, key: str, picture: np.ndarray, step: int) -> None:
    """The picture to TensorBoard (an image at `step`) and W&B (a wandb.Image in the epoch's row)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, picture, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[picture])
