"""Loading a user's data: dlrun's CSV preprocessing and image cache against the plain ways.

    python benchmarks/user_data.py                      # 1M x 50 CSV, 5,000 64x64 JPEGs: a table
    python benchmarks/user_data.py --rows 100000 --images 1000 --json out.json

CSV: a table of `--rows` rows and 50 mixed columns (35 floats with missing values, 5 integers, 10 text
columns of 4-30 values with missing ones, a binary text target) is read by `pandas.read_csv` alone,
then by dlrun's `dataset=csv` (read, encode, split, fit on the training split, transform, tensors).
Images: `--images` generated 64x64 JPEGs in 10 class folders; dlrun's first `prepare()` decodes them
into its cache, a second reads the cache; torchvision's `ImageFolder` + `DataLoader` (Resize,
CenterCrop, ToTensor; `--workers` workers) decodes every image again in every epoch.
The generated files live in a temporary directory, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


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


def bench_csv(rows: int) -> dict:
    from dlrun.data.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.csv"
        started = time.perf_counter()
        make_table(path, rows)
        made = time.perf_counter() - started
        started = time.perf_counter()
        pd.read_csv(path)
        pandas_s = time.perf_counter() - started
        started = time.perf_counter()
        spec = Table(path=str(path), target="target", name="csv").prepare()
        dlrun_s = time.perf_counter() - started
    return {"rows": rows, "columns": 50, "features": spec.input_shape[0], "generate_s": round(made, 2),
            "pandas_read_csv_s": round(pandas_s, 2), "dlrun_load_preprocess_s": round(dlrun_s, 2),
            "ratio": round(dlrun_s / pandas_s, 2)}


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


def bench_images(count: int, workers: int, epochs: int) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from dlrun.data.image_folder import ImageFolder

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        started = time.perf_counter()
        make_images(root, count)
        made = time.perf_counter() - started
        timings = {}
        for run in ("first", "later"):
            started = time.perf_counter()
            ImageFolder(root=str(root), size=64, cache_dir=str(Path(tmp) / "cache"), name="image_folder").prepare()
            timings[run] = time.perf_counter() - started
        transform = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor()])
        loader = DataLoader(datasets.ImageFolder(str(root), transform=transform), batch_size=256, shuffle=True,
                            num_workers=workers, persistent_workers=workers > 0)
        per_epoch = []
        for _ in range(epochs):
            started = time.perf_counter()
            for _batch in loader:
                pass
            per_epoch.append(time.perf_counter() - started)
    return {"images": count, "size": 64, "generate_s": round(made, 2),
            "dlrun_first_run_decode_and_cache_s": round(timings["first"], 2),
            "dlrun_later_run_read_cache_s": round(timings["later"], 2),
            "dlrun_epoch_s": 0.0,  # the images are tensors in memory after prepare(): an epoch reads no file
            "torchvision_workers": workers,
            "torchvision_epoch_s": [round(t, 2) for t in per_epoch],
            "first_run_vs_torchvision_epoch": round(timings["first"] / min(per_epoch), 2),
            "later_run_vs_torchvision_epoch": round(timings["later"] / min(per_epoch), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2, help="torchvision DataLoader workers")
    parser.add_argument("--epochs", type=int, default=2, help="torchvision epochs timed")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    results = {"csv": bench_csv(args.rows), "images": bench_images(args.images, args.workers, args.epochs)}
    for name, row in results.items():
        print(f"\n{name}")
        for key, value in row.items():
            print(f"  {key:<38} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
