"""A user's arrays: inputs X and labels y from an `.npz` file, or from a directory of `X.npy` and `y.npy`.

X's shape after the sample axis decides the input kind, as for every data set: (N, F) flat vectors,
(N, T, F) sequences, (N, C, H, W) images. y is one label per sample (N,), or (N, K) numbers for K
regression outputs; its task is inferred as a CSV target's is (dlrun.data.targets). Files are read
with `allow_pickle=False`: arrays of Python objects are refused, so nothing in a file runs code.
`.npy` files are memory-mapped, so that a streamed data set (dataset.in_memory) is read as batches need
it; an `.npz` is read whole.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from dlrun.data.datamodule import Arrays, InMemoryDataModule
from dlrun.data.targets import check_task, encode_target
from dlrun.errors import DataError

EXAMPLE = "dataset.path=features.npz"


class ArrayFile(InMemoryDataModule):
    """`x_key` and `y_key` of the `.npz` at `path` (or `<path>/<key>.npy` when `path` is a directory)."""

    def __init__(self, path: str | None = None, x_key: str = "X", y_key: str = "y", task: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.path = path
        self.x_key, self.y_key = str(x_key), str(y_key)
        self.task_setting = check_task(task, self.name)

    def load(self) -> Arrays:
        x, y = self.read(self.x_key), self.read(self.y_key)
        where = Path(self.path).expanduser()
        if x.ndim not in (2, 3, 4):
            raise DataError(f"dataset={self.name}: {self.x_key} in {where} has shape {x.shape}; expected (N, F) flat, "
                            "(N, T, F) sequences or (N, C, H, W) images.", "Reshape it before saving.")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if len(x) != len(y) or y.ndim not in (1, 2):
            raise DataError(f"dataset={self.name}: {self.x_key} {x.shape} and {self.y_key} {y.shape} in {where} do not "
                            "pair up: y needs one label per sample (N,), or (N, K) regression targets.",
                            "Save one label per row of X.")
        if x.dtype.kind not in "fiub":
            raise DataError(f"dataset={self.name}: {self.x_key} in {where} holds {x.dtype} values; inputs must be numbers.",
                            "Encode them as numbers before saving.")
        if y.ndim == 2:  # several outputs: regression only
            if y.dtype.kind not in "fiu" or self.task_setting not in (None, "regression"):
                raise DataError(f"dataset={self.name}: {self.y_key} in {where} has shape {y.shape}: (N, K) labels are "
                                "K regression targets, and must be numbers.", "Save classes as one label per sample (N,).")
            self.task = "regression"
            return Arrays(x, y.astype(np.float32))
        target = encode_target(y, self.task_setting, f"{self.y_key} in {where}")
        self.task = target.task
        return Arrays(x, target.y, class_names=target.class_names)

    def read(self, key: str) -> np.ndarray:
        """One array, from the .npz's member `key` or from the directory's `key`.npy."""
        if self.path is None:
            raise DataError(f"dataset={self.name} needs a file, and dataset.path is not set.",
                            f"Point dataset.path at an .npz file (or a directory of .npy files): dlrun dataset={self.name} {EXAMPLE}")
        where = Path(self.path).expanduser()
        if where.is_dir():
            file = where / f"{key}.npy"
            if not file.is_file():
                raise DataError(f"dataset={self.name}: the directory {where.resolve()} (dataset.path) has no {file.name}.",
                                "Put X.npy and y.npy there (names: dataset.x_key, dataset.y_key), or point "
                                "dataset.path at an .npz file.")
            return self._load(file, lambda loaded: loaded, mmap_mode="r")  # streamed data is read as batches need it
        if not where.exists():
            raise DataError(f"dataset={self.name}: no file at {where.resolve()} (dataset.path).",
                            f"Point dataset.path at an .npz file: dlrun dataset={self.name} {EXAMPLE}")
        if where.suffix.lower() != ".npz":
            raise DataError(f"dataset={self.name}: {where.resolve()} (dataset.path) is not an .npz file.",
                            "Save X and y with numpy.savez (an .npz), or put X.npy and y.npy in a directory and "
                            "point dataset.path at the directory.")
        if where.stat().st_size == 0:
            raise DataError(f"dataset={self.name}: {where.resolve()} (dataset.path) is empty.", "Save the arrays again.")

        def member(archive) -> np.ndarray:
            if key not in archive.files:
                raise DataError(f"dataset={self.name}: {where.resolve()} has no array {key!r}; it holds "
                                f"{', '.join(archive.files) or 'none'}.", "Name them with dataset.x_key and dataset.y_key.")
            return archive[key]

        return self._load(where, member)

    def _load(self, file: Path, pick, mmap_mode: str | None = None) -> np.ndarray:
        try:
            loaded = np.load(file, allow_pickle=False, mmap_mode=mmap_mode)
            try:
                return pick(loaded)
            finally:
                if hasattr(loaded, "close"):
                    loaded.close()
        except DataError:
            raise
        except ValueError as err:
            if "allow_pickle" in str(err) or "Python objects" in str(err):  # np.load, or its memory map
                raise DataError(f"dataset={self.name}: {file.resolve()} holds an array of Python objects, which dlrun "
                                "does not load (loading them could run code).",
                                "Save arrays of numbers (or of fixed-width strings for labels).") from err
            raise DataError(f"dataset={self.name}: cannot read {file.resolve()}: {err}", "Save the arrays again.") from err
        except (OSError, EOFError, zipfile.BadZipFile) as err:
            raise DataError(f"dataset={self.name}: cannot read {file.resolve()}: {err}", "Save the arrays again.") from err
