"""Loading a user's data: dlrun's CSV preprocessing, image cache and streaming against the plain ways.

    python benchmarks/user_data.py                      # 1M x 50 CSV, 20,000 64x64 JPEGs, 512 MB streamed
    python benchmarks/user_data.py --small --json out.json

CSV: a table of `--rows` rows and 50 mixed columns (35 floats with missing values, 5 integers, 10 text
columns of 4-31 values with missing ones, a binary text target) is read by `pandas.read_csv` alone, then
loaded by dlrun's `dataset=csv` (read, encode, split, fit on the training split, transform, tensors) twice:
a first load, which parses the file and writes its cache of parsed columns, and a later one (a sweep's next
job, dlrun-eval), which reads that cache. The three run back to back, `--repeats` rounds, so that a busy
machine slows a round's calls alike; reported for each load: the median of the rounds' ratios to read_csv
and their range, median wall and CPU (user + system, all threads) seconds; and the load average; then one
more first load timed stage by stage. `--table FILE` times a table written before (by `make_table`)
instead of writing one (a million rows take minutes to write).
Target: dlrun <= 1.5x read_csv.

Images: `--images` generated 64x64 JPEGs in 10 class folders (`--images-dir` keeps them for later runs).
dlrun's `dataset=image_folder` decodes them once into its memory-mapped cache, then trains on the streamed
training split (`in_memory=false`, `--workers` loader workers, batches of 256) with its own Trainer
(grouped steps, callbacks, metrics). Against it, a plain PyTorch loop (forward, cross-entropy, backward,
Adam step) trains the same network (model=mlp, width 32: small, so that loading dominates; the same seed)
over the same training images with the same workers, batch size, shuffling and one torch thread in every
training process, fed by torchvision's `ImageFolder` + `DataLoader` (Resize, CenterCrop, ToTensor,
Normalize with dlrun's statistics), which decodes every image in every epoch (target: dlrun >= 1.5x),
and by a plain `DataLoader` over a Dataset that reads the same cache file item by item and normalizes
alike (target: dlrun >= 0.9x). Training images per second from the second epoch on (the first starts
the workers), validation off in all three; the three run in turns, `--image-repeats` times, and each
ratio is the median of the rounds' own ratios, with their range.

Streaming: an `X.npy` of `--stream-mb` MB (float32, 1000 features) trained on for an epoch by a real
`dlrun dataset=arrays` process with a memory budget of a quarter of it, so the data is streamed; its peak
RSS against the same command on a file 64 times smaller, held in memory (what Python, torch, Lightning
and a run take: the constant). Target: the difference stays within the budget. For scale, the same
command on the large file with `dataset.in_memory=true`.

Every generated file lives in a temporary directory, deleted at the end. Times on a busy machine vary:
run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
from rich.console import Console
from rich.table import Table as RichTable

BATCH = 256
FEATURES = 1000  # of the streamed array
FULL = {"rows": 1_000_000, "images": 20_000, "stream_mb": 512}
SMALL = {"rows": 100_000, "images": 2_000, "stream_mb": 64}


def make_table(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    columns = {}
    for j in range(35):
        values = rng.normal(j, 1 + j % 5, rows)
        values[rng.random(rows) < 0.02] = np.nan
        columns[f"f{j}"] = values
    for j in range(5):
        columns[f"i{j}"] = rng.integers(0, 1000, rows)
    for j in range(10):
        levels = np.array([f"c{j}_{k}" for k in range(4 + 3 * j)], dtype=object)
        values = levels[rng.integers(0, len(levels), rows)]
        values[rng.random(rows) < 0.02] = None
        columns[f"s{j}"] = values
    columns["target"] = np.where(columns["f1"] > 1, "yes", "no")
    pd.DataFrame(columns).to_csv(path, index=False)


def best_time(fn, repeats: int) -> tuple[float, object]:
    """The shortest of `repeats` calls' wall times, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), result


def timed(fn) -> tuple[float, float]:
    """Wall and CPU (user + system, every thread of this process) seconds of one call of `fn`."""
    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    wall, used = time.perf_counter(), cpu()
    fn()
    return time.perf_counter() - wall, cpu() - used


def bench_csv(rows: int, repeats: int, tmp: Path, table: Path | None = None) -> dict:
    from dlrun.data.table import Table

    path = table or tmp / "table.csv"
    if table is None:
        make_table(path, rows)
        aged = path.stat().st_mtime - 60  # a file modified seconds ago is not cached (see TableCache)
        os.utime(path, (aged, aged))
    else:
        rows = sum(1 for _ in path.open("rb")) - 1
    features, notes = [], []

    def dlrun_csv(cache_dir: Path):  # cache_min_mb=0: --small tables are cached too
        def load() -> None:
            dm = Table(path=str(path), target="target", name="csv", cache_dir=str(cache_dir), cache_min_mb=0)
            features.append(dm.prepare().input_shape[0])
            notes.append(dm.notes.get("cache"))
        return load

    rounds = []
    for k in range(repeats):  # in turns: read_csv; a first load (the cache built); a later one (it read)
        load = dlrun_csv(tmp / f"table_cache_{k}")
        rounds.append((timed(lambda: pd.read_csv(path)), timed(load), timed(load)))
    assert notes == ["built", "read"] * repeats, notes  # the cache did what each side is labelled
    stages = csv_stages(path, tmp / "table_cache_stages")
    median = lambda values: float(np.median(values))  # noqa: E731
    result = {"rows": rows, "columns": 50, "features": features[0], "megabytes": round(path.stat().st_size / 1e6),
              "cache_megabytes": round(sum(f.stat().st_size for f in (tmp / "table_cache_0").iterdir()) / 1e6),
              "repeats": repeats, "load_average": [round(v, 1) for v in os.getloadavg()],
              "pandas_read_csv_s": round(median([r[0][0] for r in rounds]), 3),
              "pandas_read_csv_cpu_s": round(median([r[0][1] for r in rounds]), 3)}
    for side, k in (("first", 1), ("later", 2)):  # each ratio: the median of the rounds' own ratios
        ratios = [r[k][0] / r[0][0] for r in rounds]
        result[side] = {"wall_s": round(median([r[k][0] for r in rounds]), 3),
                        "cpu_s": round(median([r[k][1] for r in rounds]), 3),
                        "ratio": round(median(ratios), 2), "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)]}
    result["rounds_s"] = [[round(t[0], 2) for t in r] for r in rounds]
    result["stages"] = stages
    return result


def csv_stages(path: Path, cache: Path) -> dict:
    """{stage: [wall, CPU] seconds} of one first `dataset=csv` prepare (the cache built under `cache`): its
    methods timed on this instance."""
    from dlrun.data.table import Table

    dm = Table(path=str(path), target="target", name="csv", cache_dir=str(cache), cache_min_mb=0)
    spent: dict[str, list[float]] = {}

    def timing(owner, method: str, stage: str):
        call = getattr(owner, method)

        def timed_call(*args):
            result = []
            wall, cpu = timed(lambda: result.append(call(*args)))
            spent[stage] = [a + b for a, b in zip(spent.get(stage, [0.0, 0.0]), (wall, cpu), strict=True)]
            return result[0]
        setattr(owner, method, timed_call)

    encoded = "text columns encoded (for the cache and the features)"
    for owner, method, stage in ((dm, "read", "read"), (dm.cache, "columns", encoded), (dm, "load", "load"),
                                 (dm, "_split", "split (the cache written meanwhile, on a thread)"),
                                 (dm, "preprocess", "preprocess (fit on train, transform every split)"),
                                 (dm.cache, "write", "cache write")):
        timing(owner, method, stage)
    total = timed(dm.prepare)
    read, load, text = spent.pop("read"), spent.pop("load"), spent.pop(encoded)  # both within the load
    writing = spent.pop("cache write")  # on its own thread, overlapping the stages after the load
    spent = {"read": read, encoded: text, "load after the read (target; columns start encoding)":
             [a - b - c for a, b, c in zip(load, read, text, strict=True)], **spent}
    spent["rest (tensors, batching path, spec; the cache's write waited for)"] = [
        t - sum(s[k] for s in spent.values()) for k, t in enumerate(total)]
    spent["total"] = list(total)
    stages = {stage: [round(wall, 3), round(cpu, 3)] for stage, (wall, cpu) in spent.items()}
    return {**stages, "the cache's write, wall on its thread (within the stages above)": [round(writing[0], 3), None]}


def make_images(root: Path, count: int, classes: int = 10, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
    base = rng.integers(0, 256, size=(classes, 3))
    for i in range(count):
        c = i % classes
        pixels = np.clip(rng.normal(base[c], 50, size=(64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"class{c}" / f"{i:06d}.jpg", quality=90)


MODEL = ["model=mlp", "model.width=32"]  # every image loop trains this network: small, so loading dominates


class EpochTimer(pl.Callback):
    """Seconds and images of each training epoch, from its start (the loader's iterator made) to its last step's end.

    A callback of dlrun's Trainer, and called by hand in the plain loops, so that all are timed alike."""

    def __init__(self):
        self.epochs: list[tuple[float, int]] = []

    def on_train_epoch_start(self, *_):
        self._start, self._end, self._images = time.perf_counter(), None, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        grouped = isinstance(batch[0], (tuple, list))  # dlrun hands a group of (x, y) batches to one step
        self._images += sum(len(x) for x, _ in batch) if grouped else len(batch[0])
        self._end = time.perf_counter()

    def on_train_epoch_end(self, *_):
        self.epochs.append((self._end - self._start, self._images))

    def throughput(self) -> float:
        """Images per second over the epochs after the first (which starts the workers)."""
        timed = self.epochs[1:]
        return sum(n for _, n in timed) / sum(t for t, _ in timed)


def image_experiment(root: Path, cache: Path, workers: int, epochs: int):
    """The config, data module and Experiment of `dlrun dataset=image_folder dataset.in_memory=false`, built as dlrun
    builds them (seeded: every call gives the same network)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dlrun import CONF_DIR
    from dlrun.run import build_experiment

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "dataset=image_folder", f"dataset.root={root}", f"dataset.cache_dir={cache}", "dataset.size=64",
            "dataset.in_memory=false", f"dataset.num_workers={workers}", f"dataset.batch_size={BATCH}", *MODEL,
            f"trainer.max_epochs={epochs}", "trainer.limit_val_batches=0",  # training epochs only, in every loop
            "callbacks.early_stopping.enabled=false", "callbacks.progress_bar=false",
            "callbacks.model_summary=false", "print_config=false"])
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, _, module = build_experiment(cfg, {"dataset": "image_folder", "model": "mlp"})
    return cfg, datamodule, module


def train_dlrun(root: Path, cache: Path, workers: int, epochs: int, tmp: Path) -> EpochTimer:
    """dlrun's Trainer (grouped steps, its callbacks and metrics) on the streamed image folder."""
    from dlrun.run import build_trainer
    from dlrun.rundir import RunDir

    cfg, datamodule, module = image_experiment(root, cache, workers, epochs)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory(dir=tmp) as run_dir:
        trainer, _, _ = build_trainer(cfg, RunDir(run_dir), {"hardware": "cpu"}, extra_callbacks=[timer])
        trainer.fit(module, datamodule=datamodule)
    return timer


def train_plain(loader, network, cfg, epochs: int) -> EpochTimer:
    """The plain PyTorch loop: forward, cross-entropy, backward, Adam step, batch after batch of `loader`."""
    import torch
    import torch.nn.functional as F

    torch.use_deterministic_algorithms(cfg.trainer.deterministic)  # as dlrun's Trainer sets it
    optimizer = torch.optim.Adam(network.parameters(), lr=cfg.optim.lr)
    network.train()
    timer = EpochTimer()
    for _ in range(epochs):
        timer.on_train_epoch_start()
        for batch_idx, (x, y) in enumerate(loader):
            loss = F.cross_entropy(network(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            timer.on_train_batch_end(None, None, None, (x, y), batch_idx)
        timer.on_train_epoch_end()
    return timer


class CachedImages:
    """The plain way to read dlrun's cache: a map-style Dataset over the memory-mapped .npy, one image per item,
    scaled and normalized as dlrun does (so every loop feeds the network the same numbers)."""

    def __init__(self, path: Path, labels: np.ndarray, mean, std):
        self.path, self.labels, self.mean, self.std, self.images = path, labels, mean, std, None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        import torch

        if self.images is None:  # opened in the worker that reads it
            self.images = np.load(self.path, mmap_mode="r")
        x = torch.from_numpy(np.array(self.images[i])).float().div_(255.0).sub_(self.mean).div_(self.std)
        return x, int(self.labels[i])


def bench_images(count: int, workers: int, epochs: int, repeats: int, tmp: Path, images_dir: Path | None) -> dict:
    """dlrun, the plain loop over the cache and torchvision's, in turns, `repeats` times: each ratio is the median of
    the repeats' own ratios (the turns of one repeat share the machine's load of the moment)."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from dlrun.models.base import build_network

    torch.set_num_threads(1)  # every loop's training process; each DataLoader worker runs one thread too
    root, cache = (images_dir or tmp) / "images", tmp / "cache"
    started = time.perf_counter()
    if len(list(root.glob("*/*.jpg"))) != count:  # an --images-dir made by an earlier run is reused
        if root.exists():
            raise SystemExit(f"{root} holds other files than {count} generated JPEGs: give an empty --images-dir")
        make_images(root, count)
    made = time.perf_counter() - started
    started = time.perf_counter()
    cfg, dm, _ = image_experiment(root, cache, workers, epochs)  # decodes every image into the cache
    decode_s = time.perf_counter() - started

    # the plain loops read dlrun's training split: rows of the cache, in the folder's order, which torchvision's
    # ImageFolder shares (sorted classes, sorted files)
    train = dm.streamed["train"][0]
    rows = train.index if train.index is not None else np.arange(len(train))
    mean, std = (s[0] for s in dm.norm_stats)  # (C, 1, 1): dlrun's normalization, fitted on the training split
    files, _ = dm.listing(dm.folder())
    [cache_file] = cache.glob("*.npy")
    labels = np.array([label for _, _, label in files])
    loader = {"batch_size": BATCH, "shuffle": True, "num_workers": workers, "persistent_workers": workers > 0}
    transform = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor(),
                                    transforms.Normalize(mean.flatten().tolist(), std.flatten().tolist())])

    def plain(dataset) -> EpochTimer:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the same network as dlrun's, the same weights
        network = build_network(cfg.model, dm.spec, "mlp", {})
        return train_plain(DataLoader(Subset(dataset, rows), **loader), network, cfg, epochs)

    turns = []
    for _ in range(repeats):
        turns.append({"dlrun": train_dlrun(root, cache, workers, epochs, tmp),
                      "plain_cache": plain(CachedImages(cache_file, labels, mean, std)),
                      "torchvision": plain(datasets.ImageFolder(str(root), transform=transform))})
    speed = {k: [t[k].throughput() for t in turns] for k in turns[0]}
    ratios = {k: [d / b for d, b in zip(speed["dlrun"], speed[k], strict=True)] for k in ("torchvision", "plain_cache")}
    return {"images": count, "train_images": len(rows), "size": 64, "workers": workers, "epochs": epochs,
            "repeats": repeats, "batch_size": BATCH, "model": " ".join(MODEL), "torch_threads": 1,
            "generate_s": round(made, 2), "dlrun_decode_and_cache_s": round(decode_s, 2),
            **{f"{k}_images_per_s": round(statistics.median(v)) for k, v in speed.items()},
            **{f"ratio_vs_{k}": round(statistics.median(v), 2) for k, v in ratios.items()},
            **{f"ratio_vs_{k}_range": [round(min(v), 2), round(max(v), 2)] for k, v in ratios.items()},
            "epoch_s": {k: [_rounded([s for s, _ in t[k].epochs]) for t in turns] for k in turns[0]}}


def write_arrays(folder: Path, rows: int, seed: int = 0) -> int:
    """X.npy (rows x FEATURES float32, written in chunks: never all in memory) and y.npy; X's bytes."""
    folder.mkdir(parents=True)
    x = np.lib.format.open_memmap(folder / "X.npy", mode="w+", dtype=np.float32, shape=(rows, FEATURES))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 4096):
        stop = min(rows, start + 4096)
        x[start:stop] = rng.standard_normal((stop - start, FEATURES), dtype=np.float32)
    x.flush()
    del x
    np.save(folder / "y.npy", rng.integers(0, 3, rows))
    return rows * FEATURES * 4


def peak_rss(folder: Path, budget: int, out: Path, *overrides: str) -> tuple[int, dict]:
    """Peak RSS in bytes of one `dlrun dataset=arrays` run (a real process, an epoch), and its data path."""
    command = [sys.executable, "-m", "dlrun.cli", "dataset=arrays", f"dataset.path={folder}",
               f"dataset.memory_budget={budget}", f"dataset.batch_size={BATCH}", "model=mlp", "model.width=16",
               "trainer.max_epochs=1", "callbacks.progress_bar=false", "print_config=false", *overrides]
    env = {**os.environ, "DLRUN_OUTPUT_DIR": str(out)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # the child's own peak (Popen.wait would not say)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"dlrun failed ({process.returncode}):\n{output[-3000:]}")
    [summary] = out.glob("runs/*/*/summary.json")
    return usage.ru_maxrss * 1024, json.loads(summary.read_text())["data_path"]


def bench_streaming(megabytes: int, tmp: Path) -> dict:
    rows = megabytes * (1 << 20) // (FEATURES * 4)
    size = write_arrays(tmp / "big", rows)
    budget = size // 4
    write_arrays(tmp / "small", max(rows // 64, 2 * BATCH))
    constant, small_path = peak_rss(tmp / "small", budget, tmp / "out_small")
    peak, path = peak_rss(tmp / "big", budget, tmp / "out_big")
    held, held_path = peak_rss(tmp / "big", budget, tmp / "out_held", "dataset.in_memory=true")  # what streaming saves
    return {"data_mb": size >> 20, "budget_mb": budget >> 20, "mode": path["mode"], "small_mode": small_path["mode"],
            "peak_rss_mb": peak >> 20, "constant_mb": constant >> 20, "above_constant_mb": (peak - constant) >> 20,
            "within_budget": peak - constant <= budget, "in_memory_peak_rss_mb": held >> 20,
            "in_memory_mode": held_path["mode"]}


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 2) for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help=f"small sizes ({SMALL['rows']:,} rows, {SMALL['images']:,} images, {SMALL['stream_mb']} MB)")
    parser.add_argument("--rows", type=int, help=f"CSV rows (default {FULL['rows']:,})")
    parser.add_argument("--images", type=int, help=f"JPEGs (default {FULL['images']:,})")
    parser.add_argument("--stream-mb", type=int, help=f"size of the streamed array (default {FULL['stream_mb']})")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for every loader")
    parser.add_argument("--epochs", type=int, default=3, help="image epochs (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="CSV: rounds (read_csv, dlrun first and later load)")
    parser.add_argument("--table", type=Path, help="CSV: time this table (written by make_table) instead of a new one")
    parser.add_argument("--image-repeats", type=int, default=3, help="images: rounds of the three loops in turns")
    parser.add_argument("--images-dir", metavar="DIR", help="images: keep the generated JPEGs here and reuse them")
    parser.add_argument("--only", choices=("csv", "images", "streaming"), action="append", help="run only these")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    sizes = {k: getattr(args, k) or (SMALL if args.small else FULL)[k] for k in FULL}
    parts = args.only or ["csv", "images", "streaming"]
    results = {"cpus": os.cpu_count(), "small": args.small}
    with tempfile.TemporaryDirectory() as tmp:
        if "csv" in parts:
            results["csv"] = bench_csv(sizes["rows"], args.repeats, Path(tmp), args.table)
        if "images" in parts:
            results["images"] = bench_images(sizes["images"], args.workers, max(args.epochs, 2), args.image_repeats,
                                             Path(tmp), args.images_dir and Path(args.images_dir))
        if "streaming" in parts:
            results["streaming"] = bench_streaming(sizes["stream_mb"], Path(tmp))
    show(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def show(results: dict) -> None:
    table = RichTable("measure", "dlrun", "against", "ratio", "target", title=f"your own data · {results['cpus']} CPUs")
    if "csv" in results:
        c = results["csv"]
        for side, what in (("first", "first load (parses, writes the cache)"), ("later", "later load (reads the cache)")):
            d = c[side]
            table.add_row(f"CSV {c['rows']:,} x {c['columns']} ({c['megabytes']} MB): {what}, median of {c['repeats']} rounds",
                          f"{d['wall_s']:.2f} s", f"pandas.read_csv {c['pandas_read_csv_s']:.2f} s",
                          f"{d['ratio']:.2f}x ({d['ratio_range'][0]:.2f}-{d['ratio_range'][1]:.2f})", "<= 1.5x")
            table.add_row("  CPU seconds, all threads", f"{d['cpu_s']:.2f} s", f"{c['pandas_read_csv_cpu_s']:.2f} s",
                          f"{d['cpu_s'] / c['pandas_read_csv_cpu_s']:.2f}x", "")
        for stage, (wall, cpu) in c["stages"].items():
            spent = f"{wall:.2f} s (wall)" if cpu is None else f"{wall:.2f} / {cpu:.2f} s"
            table.add_row(f"  one more first load: {stage}" + ("" if cpu is None else " (wall / CPU)"), spent, "", "", "")
    if "images" in results:
        i = results["images"]
        label = (f"{i['train_images']:,} of {i['images']:,} JPEGs, {i['workers']} workers, {i['model']}: "
                 f"training images/s, epochs 2-{i['epochs']}, median of {i['repeats']}")
        for k, name, target in (("torchvision", "torchvision ImageFolder", ">= 1.5x"),
                                ("plain_cache", "plain loop over the cache", ">= 0.9x")):
            low, high = i[f"ratio_vs_{k}_range"]
            table.add_row(label if k == "torchvision" else "", f"{i['dlrun_images_per_s']:,}" if k == "torchvision" else "",
                          f"{name} {i[f'{k}_images_per_s']:,}", f"{i[f'ratio_vs_{k}']:.2f}x ({low:.2f}-{high:.2f})", target)
    if "streaming" in results:
        s = results["streaming"]
        table.add_row(f"streaming {s['data_mb']} MB ({s['mode']}), budget {s['budget_mb']} MB: peak RSS",
                      f"{s['peak_rss_mb']} MB", f"a run in memory {s['constant_mb']} MB",
                      f"+{s['above_constant_mb']} MB", f"<= +{s['budget_mb']} MB")
        table.add_row(f"the same {s['data_mb']} MB held in memory (dataset.in_memory=true): peak RSS",
                      f"{s['in_memory_peak_rss_mb']} MB", "", "", "")
    Console(width=160).print(table)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
