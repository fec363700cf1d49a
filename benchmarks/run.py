"""How close dlrun comes to a plain PyTorch loop, and how fast it starts.

    python benchmarks/run.py                 # full: 30k samples per workload, 5 repeats
    python benchmarks/run.py --quick         # a few minutes on a 2-core machine
    python benchmarks/run.py --json out.json
    python benchmarks/run.py --workloads mlp --dlrun trainer.steps_per_execution=64   # what a setting costs
    python benchmarks/run.py --quick --device cuda   # all three on the GPU (dlrun with hardware=gpu)

Throughput (training samples per second, steady state) for three ways of running the same work:
the same network (built by dlrun's model classes), optimizer (Adam, lr 1e-3), batch size and data
(scikit-learn's digits repeated to the requested size):

  plain      a hand-written loop over in-memory batches: the floor for overhead
  dlrun      dlrun's own pieces (config -> data module -> Experiment -> Trainer), as `dlrun` runs them
  lightning  Lightning with a DataLoader over a TensorDataset and per-step logging (what templates do)

Each repeat trains `epochs` epochs; the first is warm-up and is dropped, and only the training steps
are timed (validation excluded). Variants run in turns within one invocation, back to back within a
repeat; the table reports each variant's median over repeats, and for the ratios the median of the
repeats' own ratios (a repeat's variants share the machine's state of the moment, which on a shared
machine drifts by tens of percent between repeats) with their lowest and highest. All three run with
the same torch determinism setting (dlrun's trainer.deterministic, on by default). Start-up rows are wall times of whole commands, medians of 3.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from dlrun import CONF_DIR
from dlrun.data.datamodule import Arrays
from dlrun.data.tabular import Digits

WORKLOADS = {"mlp": ["model=mlp"], "cnn": ["model=cnn"], "lstm": ["model=lstm"]}
BATCH_SIZE = 64
DEVICE = "cpu"  # --device: where all three variants train ("cuda": dlrun with hardware=gpu)


class RepeatedDigits(Digits):
    """Digits tiled to `n_samples` rows (then split as usual): enough steps for a stable throughput."""

    def __init__(self, n_samples: int = 30_000, **kwargs):
        super().__init__(**kwargs)
        self.n_samples = n_samples

    def load(self) -> Arrays:
        base = super().load()
        reps = -(-self.n_samples // len(base.x))
        return Arrays(np.tile(base.x, (reps, 1, 1, 1))[: self.n_samples], np.tile(base.y, reps)[: self.n_samples],
                      class_names=base.class_names)


class StepTimer(pl.Callback):
    """Seconds from the first training batch's start to the last one's end, per epoch (validation excluded)."""

    def __init__(self):
        self.epochs: list[tuple[float, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self._start, self._samples = time.perf_counter(), 0
        grouped = isinstance(batch[0], tuple)  # dlrun hands training_step a list of (x, y) batches
        self._samples += sum(len(x) for x, _ in batch) if grouped else len(batch[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append((self._end - self._start, self._samples))


def steady_throughput(epochs: list[tuple[float, int]]) -> float:
    """Samples per second over the epochs after the first (warm-up)."""
    timed = epochs[1:] or epochs
    return sum(n for _, n in timed) / sum(t for t, _ in timed)


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def build(workload: str, n_samples: int, epochs: int, overrides: Sequence[str] = ()):
    """The dlrun config, data module and Experiment for one workload, exactly as `dlrun` builds them."""
    from dlrun.run import build_experiment

    cfg = compose_cfg([
        *WORKLOADS[workload],
        *overrides,
        f"dataset._target_={RepeatedDigits.__module__}.RepeatedDigits",
        f"+dataset.n_samples={n_samples}",
        f"dataset.batch_size={BATCH_SIZE}",
        f"trainer.max_epochs={epochs}",
        "callbacks.early_stopping.enabled=false",
        "callbacks.progress_bar=false",
        "callbacks.model_summary=false",
        "print_config=false",
    ])
    choices = {"dataset": "digits", "model": workload}
    pl.seed_everything(0, verbose=False)
    datamodule, spec, module = build_experiment(cfg, choices)
    return cfg, datamodule, module


def run_plain(workload: str, n_samples: int, epochs: int) -> float:
    """(a) forward, loss, backward, step over index batches of in-memory tensors."""
    cfg, datamodule, module = build(workload, n_samples, epochs)
    network = module.network.to(DEVICE)
    x, y = (t.to(DEVICE) for t in datamodule.splits["train"])
    torch.use_deterministic_algorithms(cfg.trainer.deterministic)  # as dlrun's Trainer sets it
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    network.train()
    timings = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).to(DEVICE)
        start, seen = time.perf_counter(), 0
        for i in range(0, len(order), BATCH_SIZE):
            index = order[i : i + BATCH_SIZE]
            loss = F.cross_entropy(network(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(index)
        if DEVICE == "cuda":
            torch.cuda.synchronize()  # the queued kernels belong to this epoch's time
        timings.append((time.perf_counter() - start, seen))
    return steady_throughput(timings)


def run_dlrun(workload: str, n_samples: int, epochs: int, overrides: Sequence[str] = ()) -> float:
    """(b) dlrun's data module, Experiment and Trainer settings, with a timer added; `overrides` (the
    --dlrun option's) change dlrun's settings only."""
    from dlrun.run import build_trainer
    from dlrun.rundir import RunDir

    hardware = "gpu" if DEVICE == "cuda" else "cpu"
    cfg, datamodule, module = build(workload, n_samples, epochs, [f"hardware={hardware}", *overrides])
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _, _ = build_trainer(cfg, RunDir(tmp), {"hardware": hardware}, extra_callbacks=[timer])
        trainer.fit(module, datamodule=datamodule)
    return steady_throughput(timer.epochs)


class TemplateModule(pl.LightningModule):
    """What a typical template's LightningModule does: log the loss every step, accuracy via torchmetrics."""

    def __init__(self, network: torch.nn.Module, num_classes: int):
        super().__init__()
        import torchmetrics

        self.network = network
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.network(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def run_lightning(workload: str, n_samples: int, epochs: int) -> float:
    """(c) Lightning + DataLoader(TensorDataset, shuffle=True), default Trainer, no validation."""
    cfg, datamodule, module = build(workload, n_samples, epochs)
    x, y = datamodule.splits["train"]
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, logger=pl.loggers.CSVLogger(tmp), callbacks=[timer],
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            default_root_dir=tmp, deterministic=cfg.trainer.deterministic,
        )
        trainer.fit(TemplateModule(module.network, int(y.max()) + 1), train_dataloaders=loader)
    return steady_throughput(timer.epochs)


VARIANTS: dict[str, Callable[[str, int, int], float]] = {
    "plain": run_plain,
    "dlrun": run_dlrun,
    "lightning": run_lightning,
}


def wall(cmd: list[str], repeats: int = 3) -> float:
    """Median wall seconds of a command (its exit code is not checked: config errors exit 2 on purpose)."""
    times = []
    env = {**os.environ, "DLRUN_OUTPUT_DIR": tempfile.mkdtemp()}
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env, cwd=tempfile.gettempdir())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def startup() -> dict[str, float]:
    dlrun = [sys.executable, "-m", "dlrun.cli"]
    rows = {
        "python -c 'import torch'": wall([sys.executable, "-c", "import torch"]),
        "python -c 'import pytorch_lightning'": wall([sys.executable, "-c", "import pytorch_lightning"]),
        "dlrun --help": wall([*dlrun, "--help"]),
        "dlrun --cfg job": wall([*dlrun, "--cfg", "job"]),
        "dlrun optim.lr=-1 (config error)": wall([*dlrun, "optim.lr=-1"]),
    }
    # time to the first training step, as dlrun itself records it in summary.json
    firsts = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "DLRUN_OUTPUT_DIR": tmp}
            subprocess.run([*dlrun, "debug=fast", "print_config=false"], capture_output=True, env=env, cwd=tmp,
                           check=True)
            (summary,) = Path(tmp).glob("runs/*/*/summary.json")
            firsts.append(json.loads(summary.read_text())["startup_seconds"])
    rows["dlrun: process start to first training step"] = statistics.median(firsts)
    return rows


def _ratio(result: dict, key: str) -> str:
    """'0.91 (0.85-0.97)': the median of the repeats' ratios, then their lowest and highest."""
    low, high = result[f"{key}_range"]
    return f"{result[key]:.2f} ({low:.2f}-{high:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples: a few minutes on 2 cores")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--samples", type=int, help="samples per workload (default 30,000; 8,000 with --quick)")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up timings")
    parser.add_argument("--dlrun", nargs="+", default=[], metavar="OVERRIDE",
                        help="config overrides for dlrun's runs only, e.g. trainer.steps_per_execution=64")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where all three variants train")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    variants = {**VARIANTS, "dlrun": functools.partial(run_dlrun, overrides=args.dlrun)}
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # the table is the output
    n_samples, epochs = args.samples or (8_000 if args.quick else 30_000), 3

    results: dict[str, dict[str, float]] = {}
    for workload in args.workloads:
        samples: dict[str, list[float]] = {v: [] for v in variants}
        names = list(variants)
        for repeat in range(args.repeats):  # in turns, each repeat starting with the next variant, so that
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:  # noise hits all alike
                samples[name].append(variants[name](workload, n_samples, epochs))
        med = {name: statistics.median(values) for name, values in samples.items()}
        vs_plain = [d / p for d, p in zip(samples["dlrun"], samples["plain"], strict=True)]
        vs_lightning = [d / c for d, c in zip(samples["dlrun"], samples["lightning"], strict=True)]
        results[workload] = {
            **{f"{name}_samples_per_s": value for name, value in med.items()},
            "ratio_vs_plain": statistics.median(vs_plain),
            "ratio_vs_plain_range": [min(vs_plain), max(vs_plain)],
            "ratio_vs_lightning": statistics.median(vs_lightning),
            "ratio_vs_lightning_range": [min(vs_lightning), max(vs_lightning)],
            "repeats_samples_per_s": {name: [round(v) for v in values] for name, values in samples.items()},
        }
    start = {} if args.no_startup else startup()

    console = Console()
    settings = f"{DEVICE}, median of {args.repeats}; {n_samples} samples, batch {BATCH_SIZE}" + "".join(f"; dlrun {o}" for o in args.dlrun)
    table = Table(title=f"training throughput, samples/s ({settings})")
    for col in ("workload", "plain loop", "dlrun", "lightning+DataLoader", "dlrun / plain", "dlrun / lightning"):
        table.add_column(col, justify="right")
    for workload, r in results.items():
        table.add_row(workload, f"{r['plain_samples_per_s']:,.0f}", f"{r['dlrun_samples_per_s']:,.0f}",
                      f"{r['lightning_samples_per_s']:,.0f}", _ratio(r, "ratio_vs_plain"),
                      _ratio(r, "ratio_vs_lightning"))
    console.print(table)
    if start:
        stable = Table(title="start-up, wall seconds (median of 3)")
        stable.add_column("command")
        stable.add_column("seconds", justify="right")
        for name, seconds in start.items():
            stable.add_row(name, f"{seconds:.2f}")
        console.print(stable)

    if args.json:
        payload = {
            "throughput": results,
            "startup_seconds": start,
            "settings": {"device": DEVICE, "n_samples": n_samples, "epochs": epochs, "batch_size": BATCH_SIZE, "repeats": args.repeats,
                         "dlrun_overrides": args.dlrun},
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "python": platform.python_version(), "torch": torch.__version__},
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
