"""`dlrun-predict <run dir> <inputs>`: a trained model's predictions on new inputs, as a CSV.

    dlrun-predict outputs/runs/2026-12-02/06-00-00_123456 new_houses.csv        # <run dir>/predictions.csv
    dlrun-predict RUN new.npz --out preds.csv                                     # X of the training input shape
    dlrun-predict RUN photos/ cat.jpg --checkpoint last                           # images: a folder, or files

The inputs are in the form the run trained on: a table (CSV, TSV, Parquet) with the training feature
columns for dataset=csv; an `.npz` whose X (dataset.x_key for dataset=arrays) has the training input
shape, as the data set's own files hold it (pixels 0-255 for the vision sets); image files for
dataset=image_folder. The run is rebuilt as `dlrun-eval` does (`dlrun.evaluate`: its config, checked
for foreign classes, through `dlrun.run.build_experiment`, with its saved preprocessing; the checkpoint
read with `weights_only`), so the inputs go through the data module's own transform and the
normalization fitted on the training split (`InMemoryDataModule.prepare_inputs`). That rebuild reads the
training data again, as dlrun-eval does: it must still be where the run found it.

One row per input: `id` (the row index, or the image's file name), then `predicted` and one
`probability_<class>` per class (softmax; sigmoid for binary), or `predicted` (several outputs:
`predicted_0`, ...) for regression, in the target's units (a CSV target's standardization undone).
Inputs that do not fit the run end with exit 2 and a panel that says what was expected.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from dlrun.config import validate
from dlrun.console import console
from dlrun.error_boundary import boundary
from dlrun.errors import DataError, UserError
from dlrun.rundir import check_checkpoint_file, write_atomic
from dlrun.trust import TRUST_ENV

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


def predict(target: str | Path, inputs: list[str | Path], which: str = "best",
            out: str | Path | None = None) -> dict[str, Any]:
    """Predict on `inputs` with the run's checkpoint; write the CSV and return what was done."""
    from dlrun.evaluate import _load, require_predictor, resolve

    paths = [_existing(p) for p in inputs]
    run_dir, checkpoint_path = resolve(target, which)
    check_checkpoint_file(checkpoint_path)  # before torch is imported
    cfg = run_dir.read_config(complete=True)
    validate(cfg)
    datamodule, module, checkpoint = _load(run_dir, checkpoint_path, cfg)
    spec = datamodule.spec
    if spec.per_step:
        raise UserError(f"dataset={datamodule.name} predicts at every time step; dlrun-predict writes one "
                        "prediction per input.", "Use dlrun-eval for its metrics.", title="Not supported")
    require_predictor(module, spec, "dlrun-predict")
    ids, x = read_inputs(datamodule, paths)
    outputs = _outputs(module.network, datamodule.prepare_inputs(x))
    frame = _table(ids, outputs, spec, datamodule.preprocessing)
    out_path = Path(out) if out else run_dir.path / "predictions.csv"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, frame.to_csv(index=False))
    return {"rows": len(frame), "out": str(out_path), "checkpoint": str(checkpoint_path), "epoch": checkpoint.get("epoch"),
            "task": spec.task}


def _existing(path: str | Path) -> Path:
    where = Path(path).expanduser()
    if not where.exists():
        raise DataError(f"no file or folder at {where}.", "Pass the inputs to predict on.")
    if where.is_file() and where.stat().st_size == 0:
        raise DataError(f"{where} is empty.", "Pass a file with inputs in it.")
    return where


# --- reading inputs as the run's data set reads its own ----------------------------------------------
def read_inputs(datamodule, paths: list[Path]) -> tuple[list[str], Any]:
    """(an id per input, the inputs as the data module's `load()` gives them) from `paths`."""
    import pandas as pd

    from dlrun.data.image_folder import ImageFolder
    from dlrun.data.table import Table

    readers = {  # the kind of input each kind of data set predicts from: its reader, and what it is
        "table": (_read_table, "a table (.csv, .tsv, .parquet) with the training feature columns"),
        "image": (_read_images, "image files or folders of them"),
        "npz": (_read_npz, "an .npz of X with the training input shape"),
    }
    wanted = "table" if isinstance(datamodule, Table) else "image" if isinstance(datamodule, ImageFolder) else "npz"
    read, expected = readers[wanted]
    for path in paths:
        kind = _kind(path)
        if kind != wanted:
            shown = {"table": "a table", "image": "an image or a folder", "npz": "an .npz file"}.get(
                kind, f"a file of unknown type ({path.suffix or 'no suffix'})")
            raise DataError(f"{path} is {shown}; a run of dataset={datamodule.name} predicts from {expected}.",
                            f"Pass {expected}.")
    parts = [read(datamodule, path) for path in paths]
    if len(paths) > 1:  # several inputs: each id says which one it comes from
        parts = [([i if i == path.name else f"{path.name}/{i}" for i in part_ids], x)
                 for path, (part_ids, x) in zip(paths, parts, strict=True)]
    ids = [i for part_ids, _ in parts for i in part_ids]
    inputs = [x for _, x in parts]
    if wanted == "table":  # encoded together: a text column's value indices are over all the files' values
        return ids, datamodule.encode_new(pd.concat(inputs, ignore_index=True), ", ".join(map(str, paths)))
    return ids, np.concatenate(inputs)


def _kind(path: Path) -> str | None:
    from dlrun.data.image_folder import IMAGE_SUFFIXES

    suffix = path.suffix.lower()
    if path.is_dir() or suffix in IMAGE_SUFFIXES:
        return "image"
    return "table" if suffix in TABLE_SUFFIXES else "npz" if suffix == ".npz" else None


def _read_table(table, path: Path) -> tuple[list[str], pd.DataFrame]:
    frame = table.read(path)
    table.require_features(frame, str(path))
    return [str(i) for i in range(len(frame))], frame


def _read_npz(datamodule, path: Path) -> tuple[list[str], np.ndarray]:
    from dlrun.data.arrays import ArrayFile

    key = datamodule.x_key if isinstance(datamodule, ArrayFile) else "X"
    reader = ArrayFile(str(path), x_key=key, name=datamodule.name)
    x = reader.read(key)
    expected = tuple(datamodule.spec.input_shape)
    if x.ndim < 1 or tuple(x.shape[1:]) != expected or len(x) == 0:
        raise DataError(f"{key} in {path} has shape {x.shape}; the run was trained on inputs of shape "
                        f"{expected}, so X must be (N, {', '.join(map(str, expected))}).",
                        f"Save {key} with one row per input, each of shape {expected}.")
    if x.dtype.kind not in "fiub":
        raise DataError(f"{key} in {path} holds {x.dtype} values; inputs must be numbers.", "Encode them as numbers.")
    return [str(i) for i in range(len(x))], x


def _read_images(folder_module, path: Path) -> tuple[list[str], np.ndarray]:
    """Each image decoded as in training (resize, centre crop, channels): ids are names relative to `path`."""
    from dlrun.data.image_folder import IMAGE_SUFFIXES, decode

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        names = [str(p.relative_to(path)) for p in files]
        if not files:
            raise DataError(f"{path} holds no images (files ending in {', '.join(sorted(IMAGE_SUFFIXES))}).",
                            "Pass a folder of images, or image files.")
    else:
        files, names = [path], [path.name]
    images = np.empty((len(files), folder_module.channels, folder_module.size, folder_module.size), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            images[i] = decode(file, folder_module.size, folder_module.channels)
        except Exception as err:  # Pillow raises many kinds for a damaged file; each means "cannot decode"
            raise DataError(f"{file} cannot be decoded as an image ({type(err).__name__}).",
                            "Remove or replace it.") from err
    return names, images


# --- the network's outputs as a table ------------------------------------------------------------------
def _outputs(network, x):
    """The network's raw outputs on `x`, in evaluation mode, batch by batch, on the CPU."""
    import torch

    from dlrun.data.datamodule import EVAL_BATCH_SIZE

    network = network.cpu().eval()
    with torch.no_grad():
        batches = [network(x[i : i + EVAL_BATCH_SIZE]) for i in range(0, len(x), EVAL_BATCH_SIZE)]
    return torch.cat(batches).float()


def _table(ids: list[str], outputs, spec, preprocessing: dict | None):
    """The predictions frame of the `outputs` tensor (one row per id)."""
    import pandas as pd
    import torch

    frame = pd.DataFrame({"id": ids})
    if spec.task == "regression":
        values = outputs.reshape(len(ids), -1).double().numpy()
        if preprocessing is not None and "target_mean" in preprocessing:  # a table's standardized target
            values = values * float(preprocessing["target_std"]) + float(preprocessing["target_mean"])
        names = ["predicted"] if values.shape[1] == 1 else [f"predicted_{k}" for k in range(values.shape[1])]
        return pd.concat([frame, pd.DataFrame(values, columns=names)], axis=1)
    if spec.task == "binary":
        positive = torch.sigmoid(outputs.reshape(len(ids)).double()).numpy()
        probabilities = np.stack([1.0 - positive, positive], axis=1)
    else:
        probabilities = torch.softmax(outputs.double(), dim=1).numpy()
    classes = list(spec.class_names) or [str(k) for k in range(probabilities.shape[1])]
    frame["predicted"] = [classes[k] for k in probabilities.argmax(axis=1)]
    return pd.concat([frame, pd.DataFrame(probabilities, columns=[f"probability_{c}" for c in classes])], axis=1)


def main(argv: list[str] | None = None) -> None:
    """`dlrun-predict`: exit 0 with the CSV written, or 2 with one panel that says what is wrong."""
    parser = argparse.ArgumentParser(prog="dlrun-predict", description="Predict with a trained dlrun model on new "
                                     "inputs (a table, an .npz, images), preprocessed as in training; writes a CSV.")
    parser.add_argument("target", help="a run directory, or a checkpoint file inside one")
    parser.add_argument("inputs", nargs="+", help="a CSV/TSV/Parquet table, an .npz of X, image files or folders")
    parser.add_argument("--out", metavar="FILE", help="where the predictions go (default: <run dir>/predictions.csv)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="which checkpoint of a run directory (default: best)")
    parser.add_argument("--trust", action="store_true", help="build the classes the run's config.yaml names even if "
                        f"dlrun's configs do not define them (as {TRUST_ENV}=1 does)")
    args = parser.parse_args(argv)
    if args.trust:
        os.environ[TRUST_ENV] = "1"
    with boundary():
        result = predict(args.target, args.inputs, args.checkpoint, args.out)
    console.print(f"{result['rows']:,} predictions ({result['task']}) from {result['checkpoint']} "
                  f"(epoch {result['epoch']}) written to {result['out']}")


if __name__ == "__main__":
    main()
