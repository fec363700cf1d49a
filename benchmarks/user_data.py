"""Loading a user's data: dlrun's CSV preprocessing, image cache and streaming against the plain ways.

    python benchmarks/user_data.py                      # 1M x 50 CSV, 20,000 64x64 JPEGs, 512 MB streamed
    python benchmarks/user_data.py --small --json out.json

CSV: a table of `--rows` rows and 50 mixed columns (35 floats with missing values, 5 integers, 10 text
columns of 4-31 values with missing ones, a binary text target) is read by `pandas.read_csv` alone, then
by dlrun's `dataset=csv` (read, encode, split, fit on the training split, transform, tensors), in
`--repeats` pairs back to back, so that a busy machine slows both of a pair alike; reported: the median
ratio of the pairs and its range, each side's median wall and CPU (user + system, all threads) seconds,
and the load average. `--table FILE` times a table written before (by `make_table`) instead of writing
one (a million rows take minutes to write). Target: dlrun <= 1.5x read_csv.

Images: `--images` generated 64x64 JPEGs in 10 class folders. dlrun's `dataset=image_folder` decodes them
once into its memory-mapped cache, then streams the training split (`in_memory=false`, `--workers` loader
workers, batches of 256 as normalized float tensors). Against it, over the same training images, from the
second epoch on (the first starts the workers): torchvision's `ImageFolder` + `DataLoader` (Resize, CenterCrop, ToTensor; the same
workers and batch size), which decodes every image in every epoch (target: dlrun >= 1.5x), and a plain
`DataLoader` over a Dataset that reads the same cache file item by item (target: dlrun >= 0.9x).

Streaming: an `X.npy` of `--stream-mb` MB (float32, 1000 features) trained on for an epoch by a real
`dlrun dataset=arrays` process with a memory budget of a quarter of it, so the data is streamed; its peak
RSS against the same command on a file 64 times smaller, held in memory (what Python, torch, Lightning
and a run take: the constant). Target: the difference stays within the budget.

Every generated file lives in a temporary directory, deleted at the end. Times on a busy machine vary:
run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
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
    else:
        rows = sum(1 for _ in path.open("rb")) - 1
    features = []

    def dlrun_csv() -> None:
        features.append(Table(path=str(path), target="target", name="csv").prepare().input_shape[0])

    pairs = [(timed(lambda: pd.read_csv(path)), timed(dlrun_csv)) for _ in range(repeats)]
    ratios = [dl[0] / pandas[0] for pandas, dl in pairs]
    median = lambda values: float(np.median(values))  # noqa: E731
    return {"rows": rows, "columns": 50, "features": features[0], "megabytes": round(path.stat().st_size / 1e6),
            "repeats": repeats, "load_average": [round(v, 1) for v in os.getloadavg()],
            "pandas_read_csv_s": round(median([p[0] for p, _ in pairs]), 3),
            "dlrun_load_preprocess_s": round(median([d[0] for _, d in pairs]), 3),
            "pandas_read_csv_cpu_s": round(median([p[1] for p, _ in pairs]), 3),
            "dlrun_load_preprocess_cpu_s": round(median([d[1] for _, d in pairs]), 3),
            "ratio": round(median(ratios), 2), "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
            "pairs_s": [[round(p[0], 2), round(d[0], 2)] for p, d in pairs]}


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


def throughput(loader, epochs: int) -> tuple[float, list[float]]:
    """Images per second over epochs 2..`epochs` (the first starts the workers), and every epoch's seconds."""
    seconds, images = [], 0
    for epoch in range(epochs):
        started, seen = time.perf_counter(), 0
        for x, _ in loader:
            seen += len(x)
        seconds.append(time.perf_counter() - started)
        images += seen if epoch > 0 else 0
    return images / sum(seconds[1:]), seconds


class CachedImages:
    """The plain way to read dlrun's cache: a map-style Dataset over the memory-mapped .npy, one image per item."""

    def __init__(self, path: Path, labels: np.ndarray):
        self.path, self.labels, self.images = path, labels, None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        import torch

        if self.images is None:  # opened in the worker that reads it
            self.images = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self.images[i])).float().div_(255.0), int(self.labels[i])


def bench_images(count: int, workers: int, epochs: int, tmp: Path) -> dict:
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from dlrun.data.image_folder import ImageFolder

    torch.set_num_threads(1)
    root, cache = tmp / "images", tmp / "cache"
    started = time.perf_counter()
    make_images(root, count)
    made = time.perf_counter() - started

    dm = ImageFolder(root=str(root), size=64, cache_dir=str(cache), name="image_folder", in_memory=False,
                     num_workers=workers, batch_size=BATCH)
    first_s, _ = best_time(dm.prepare, 1)
    dlrun, dlrun_epochs = throughput(dm._batches("train", shuffle=True), epochs)

    # the plain loops read the same images: dlrun's training split (rows of the cache, in the folder's order,
    # which torchvision's ImageFolder shares: sorted classes, sorted files)
    train = dm.streamed["train"][0]
    rows = train.index if train.index is not None else np.arange(len(train))
    files, _ = dm.listing(dm.folder())
    [cache_file] = cache.glob("*.npy")
    labels = np.array([label for _, _, label in files])
    plain_cache, plain_epochs = throughput(
        DataLoader(Subset(CachedImages(cache_file, labels), rows), batch_size=BATCH, shuffle=True,
                   num_workers=workers, persistent_workers=workers > 0), epochs)
    transform = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor()])
    vision, vision_epochs = throughput(
        DataLoader(Subset(datasets.ImageFolder(str(root), transform=transform), rows), batch_size=BATCH, shuffle=True,
                   num_workers=workers, persistent_workers=workers > 0), epochs)
    return {"images": count, "train_images": len(rows), "size": 64, "workers": workers, "epochs": epochs, "generate_s": round(made, 2),
            "dlrun_decode_and_cache_s": round(first_s, 2), "dlrun_images_per_s": round(dlrun),
            "torchvision_images_per_s": round(vision), "plain_cache_images_per_s": round(plain_cache),
            "ratio_vs_torchvision": round(dlrun / vision, 2), "ratio_vs_plain_cache": round(dlrun / plain_cache, 2),
            "epoch_s": {"dlrun": _rounded(dlrun_epochs), "torchvision": _rounded(vision_epochs),
                        "plain_cache": _rounded(plain_epochs)}}


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


def peak_rss(folder: Path, budget: int, out: Path) -> tuple[int, dict]:
    """Peak RSS in bytes of one `dlrun dataset=arrays` run (a real process, an epoch), and its data path."""
    command = [sys.executable, "-m", "dlrun.cli", "dataset=arrays", f"dataset.path={folder}",
               f"dataset.memory_budget={budget}", f"dataset.batch_size={BATCH}", "model=mlp", "model.width=16",
               "trainer.max_epochs=1", "callbacks.progress_bar=false", "print_config=false"]
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
    return {"data_mb": size >> 20, "budget_mb": budget >> 20, "mode": path["mode"], "small_mode": small_path["mode"],
            "peak_rss_mb": peak >> 20, "constant_mb": constant >> 20, "above_constant_mb": (peak - constant) >> 20,
            "within_budget": peak - constant <= budget}


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
    parser.add_argument("--repeats", type=int, default=3, help="CSV: pairs (read_csv, dlrun) timed back to back")
    parser.add_argument("--table", type=Path, help="CSV: time this table (written by make_table) instead of a new one")
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
            results["images"] = bench_images(sizes["images"], args.workers, max(args.epochs, 2), Path(tmp))
        if "streaming" in parts:
            results["streaming"] = bench_streaming(sizes["stream_mb"], Path(tmp))
    show(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def show(results: dict) -> None:
    table = RichTable("measure", "dlrun", "against", "ratio", "target", title=f"your own data · {results['cpus']} CPUs")
    if "csv" in results:
        c = results["csv"]
        table.add_row(f"CSV {c['rows']:,} x {c['columns']} ({c['megabytes']} MB): load + preprocess, median of "
                      f"{c['repeats']} pairs", f"{c['dlrun_load_preprocess_s']:.2f} s",
                      f"pandas.read_csv {c['pandas_read_csv_s']:.2f} s",
                      f"{c['ratio']:.2f}x ({c['ratio_range'][0]:.2f}-{c['ratio_range'][1]:.2f})", "<= 1.5x")
        table.add_row("  CPU seconds, all threads", f"{c['dlrun_load_preprocess_cpu_s']:.2f} s",
                      f"{c['pandas_read_csv_cpu_s']:.2f} s",
                      f"{c['dlrun_load_preprocess_cpu_s'] / c['pandas_read_csv_cpu_s']:.2f}x", "")
    if "images" in results:
        i = results["images"]
        label = f"{i['images']:,} JPEGs, {i['workers']} workers: images/s, epochs 2-{i['epochs']}"
        table.add_row(label, f"{i['dlrun_images_per_s']:,}", f"torchvision ImageFolder {i['torchvision_images_per_s']:,}",
                      f"{i['ratio_vs_torchvision']:.2f}x", ">= 1.5x")
        table.add_row("", "", f"plain loop over the cache {i['plain_cache_images_per_s']:,}",
                      f"{i['ratio_vs_plain_cache']:.2f}x", ">= 0.9x")
    if "streaming" in results:
        s = results["streaming"]
        table.add_row(f"streaming {s['data_mb']} MB ({s['mode']}), budget {s['budget_mb']} MB: peak RSS",
                      f"{s['peak_rss_mb']} MB", f"a run in memory {s['constant_mb']} MB",
                      f"+{s['above_constant_mb']} MB", f"<= +{s['budget_mb']} MB")
    Console(width=160).print(table)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
