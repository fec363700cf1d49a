"""A user's table (CSV, TSV or Parquet): one column is the target, the others become flat features.

Loading turns each feature column into one column of numbers, with NaN where a value is missing:
numeric and boolean columns as they are, text (and categorical) columns as the index of each value
among the file's distinct values. The split is drawn on those rows, and the preprocessing is fitted
on the training split only (`fit_transform`): a missing value becomes the training median (numeric)
or the most frequent training value (text); numeric columns are standardized with the training mean
and std; a text column becomes one 0/1 feature per value seen in training, and a value never seen
there (only in validation or test) becomes all zeros. The fitted state is plain JSON
(`self.preprocessing`), saved as the run's `preprocessing.json` and applied as saved by dlrun-eval.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dlrun.data.datamodule import Arrays, InMemoryDataModule, Rows
from dlrun.data.targets import check_task, encode_target
from dlrun.errors import DataError, UserError

FORMAT = 1  # of preprocessing.json
PARQUET_SUFFIXES = (".parquet", ".pq")
BLOCK_BYTES = 4 << 20  # of output written per block of rows: small enough to stay in cache while its columns are


def new_array(rows: int, columns: int, dtype: torch.dtype, zeros: bool = False,
              column_major: bool = False) -> np.ndarray:
    """A new rows x columns array (uninitialized, or `zeros`), allocated by torch. NumPy asks the kernel for
    transparent huge pages for any array of 4 MB or more (madvise); where the kernel then compacts memory on
    demand to find them (THP defrag=madvise, its default), the first touch of a large array on a busy
    machine waits for that: measured here, two to three seconds of system time for the 1.3 GB of a
    million-row table. torch does not ask."""
    new = torch.zeros if zeros else torch.empty
    return new((columns, rows), dtype=dtype).numpy().T if column_major else new((rows, columns), dtype=dtype).numpy()


def in_threads(work, items) -> list:
    """`[work(item) for item in items]` on a few threads: numpy and pandas release the GIL in the long
    loops (copies, arithmetic, sorting, hashing), so columns and blocks of rows proceed in parallel.
    The first item (in order) to raise raises, as in the plain loop."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(work, items))


def require_file(path: str | None, name: str, knob: str, example: str) -> Path:
    """`path` as an existing, non-empty file, or a DataError that names it and says what to set."""
    hint = f"Point dataset.{knob} at your file: dlrun dataset={name} {example}"
    if path is None:
        raise DataError(f"dataset={name} needs a file, and dataset.{knob} is not set.", hint)
    where = Path(path).expanduser()
    if where.is_dir():
        raise DataError(f"dataset={name}: {where.resolve()} (dataset.{knob}) is a directory; a file is wanted.", hint)
    if not where.exists():
        raise DataError(f"dataset={name}: no file at {where.resolve()} (dataset.{knob}).", hint)
    if where.stat().st_size == 0:
        raise DataError(f"dataset={name}: {where.resolve()} (dataset.{knob}) is empty.", hint)
    return where


class Table(InMemoryDataModule):
    """`target` is the label column of the table at `path`; `features` (default: every other column) the inputs.

    `normalize` standardizes the numeric columns (one-hot columns stay 0/1); `standardize_target` does
    the same to a regression target, so that its loss is in units of the target's training std.
    """

    def __init__(
        self,
        path: str | None = None,
        target: str | None = None,
        features: list[str] | None = None,
        task: str | None = None,
        missing: str = "impute",
        max_categories: int = 50,
        standardize_target: bool = True,
        normalize: bool = True,
        **kwargs,
    ):
        super().__init__(normalize=False, **kwargs)  # the preprocessing standardizes what it should
        self.path = path
        self.target = None if target is None else str(target)
        self.features = None if features is None else [str(f) for f in features]
        self.task = check_task(task, self.name)
        self.task_setting = task
        if missing not in ("impute", "error"):
            raise UserError(f"dataset.missing = {missing!r}: expected impute or error")
        if isinstance(max_categories, bool) or not isinstance(max_categories, int) or max_categories < 1:
            raise UserError(f"dataset.max_categories = {max_categories!r}: expected an integer >= 1")
        self.missing = missing
        self.max_categories = max_categories
        self.standardize = normalize
        self.standardize_target = standardize_target
        self.levels: dict[str, np.ndarray] = {}  # a text column's distinct values, by index, in this file
        self.target_classes: tuple[str, ...] = ()

    # --- reading ------------------------------------------------------------------------------
    def read(self, path: str | Path | None = None) -> pd.DataFrame:
        """The table at `path` (default: dataset.path) as a DataFrame with string column names."""
        path = require_file(self.path if path is None else str(path), self.name, "path",
                            "dataset.path=houses.csv dataset.target=price")
        try:
            if path.suffix.lower() in PARQUET_SUFFIXES:
                try:
                    import pyarrow  # noqa: F401  (pandas reads Parquet through it)
                except ImportError as err:
                    raise DataError(f"dataset={self.name}: reading {path.name} (Parquet) needs pyarrow, which is "
                                    "not installed.", 'pip install "dlrun[parquet]" (or pip install pyarrow)') from err
                frame = pd.read_parquet(path)
            else:
                frame = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
        except DataError:
            raise
        except pd.errors.EmptyDataError as err:
            raise DataError(f"dataset={self.name}: {path.resolve()} is empty (no header, no rows).",
                            "Point dataset.path at a table with a header line and rows.") from err
        except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
            raise DataError(f"dataset={self.name}: cannot read {path.resolve()} as a table: {err}".strip(),
                            "CSV (comma-separated, a header line), TSV (.tsv) or Parquet (.parquet) are read.") from err
        if len(frame) == 0:
            raise DataError(f"dataset={self.name}: {path.resolve()} has a header but no rows.",
                            "Point dataset.path at a table with data.")
        frame.columns = [str(c) for c in frame.columns]
        return frame

    def load(self) -> Arrays:
        frame = self.read()
        columns = list(frame.columns)
        listed = ", ".join(columns[:40]) + (", ..." if len(columns) > 40 else "")
        if self.target is None:
            raise DataError(f"dataset={self.name}: dataset.target is not set; the columns of {self.path} are: {listed}.",
                            f"Name the label column: dlrun dataset={self.name} dataset.path={self.path} dataset.target=COLUMN")
        if self.target not in columns:
            raise DataError(f"dataset={self.name}: {self.path} has no column {self.target!r} (dataset.target); "
                            f"its columns are: {listed}.", "Set dataset.target to one of them (names are case-sensitive).")
        features = self.features if self.features is not None else [c for c in columns if c != self.target]
        unknown = [f for f in features if f not in columns]
        if unknown or self.target in features or not features:
            problem = (f"has no column {', '.join(map(repr, unknown))}" if unknown else
                       f"cannot use the target {self.target!r} as a feature" if self.target in features else
                       "has no feature column besides the target")
            raise DataError(f"dataset={self.name}: {self.path} {problem} (dataset.features); its columns are: {listed}.",
                            "List feature columns other than the target: dataset.features=[age,city]")
        self.features = features
        x = self._encode(frame)
        labels = frame[self.target]
        keep = labels.notna().to_numpy()
        if not keep.all():
            if self.missing == "error":
                raise DataError(f"dataset={self.name}: the target column {self.target!r} has {int((~keep).sum()):,} "
                                "missing values.", "Fill them in the file, or set dataset.missing=impute to drop those rows.")
            self.notes["rows without a target, dropped"] = int((~keep).sum())
            x, labels = x[keep], labels[keep]
        if self.missing == "error":
            gaps = np.isnan(x).sum(axis=0)
            if gaps.any():
                named = ", ".join(f"{features[j]!r} ({gaps[j]:,})" for j in np.nonzero(gaps)[0][:10])
                raise DataError(f"dataset={self.name}: {self.path} has missing values in the columns {named}.",
                                "Fill them in the file, or set dataset.missing=impute (median / most frequent value).")
        given = self.preprocessing
        # text labels as pandas holds them (Arrow strings): encoded there, not as a million Python strings
        values = labels.array if isinstance(labels.dtype, pd.StringDtype) else labels.to_numpy()
        target = encode_target(values, given["task"] if given else self.task_setting,
                               f"the target column {self.target!r}", tuple(given["class_names"]) if given else None)
        self.task, self.target_classes = target.task, target.class_names
        return Arrays(x, target.y, class_names=target.class_names)

    def _encode(self, frame: pd.DataFrame) -> np.ndarray:
        """The feature columns of `frame` as numbers (see `_encode_column`), one column each, column-major:
        each column is written in one contiguous run, and `fit` reads a split's values of a column from it."""
        x = new_array(len(frame), len(self.features), torch.float64, column_major=True)

        def encode(j: int) -> None:
            x[:, j] = self._encode_column(columns[j])

        columns = [frame[name] for name in self.features]
        in_threads(encode, range(len(columns)))
        return x

    def encode_new(self, frame: pd.DataFrame, where: str) -> np.ndarray:
        """New rows (`where`: the file they come from) encoded like the training file's, for `transform`
        after `prepare`: every feature column must be there, numeric ones still numeric; extra columns
        (the target, ids) are ignored."""
        columns = list(frame.columns)
        missing = [f for f in self.features if f not in columns]
        if missing:
            raise DataError(f"{where} lacks the column(s) {', '.join(map(repr, missing))}, which the run was trained "
                            f"on; it needs all of: {', '.join(self.features)}.",
                            "Add them (an empty value is filled as in training); names are case-sensitive.")
        kinds = {c["name"]: c["kind"] for c in self.preprocessing["columns"]}
        frame = frame.copy()
        for name in self.features:  # a text column read as numbers (or as all empty) still matches by its text
            if kinds[name] == "categorical":
                frame[name] = frame[name].astype(object).where(frame[name].isna(), frame[name].astype(str))
        x = self._encode(frame)
        now_text = sorted(name for name in self.levels if kinds.get(name) == "numeric")
        if now_text:
            raise DataError(f"{where}: the column(s) {', '.join(map(repr, now_text))} hold text, but were numbers in "
                            "training.", "Give numbers there (an empty value is filled as in training).")
        return x

    def _encode_column(self, column: pd.Series) -> np.ndarray:
        """One column as numbers (NaN: missing): numeric and boolean as they are, text as value indices."""
        dtype = column.dtype
        if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype):
            return column.to_numpy(dtype=np.float64, na_value=np.nan)
        if pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype):
            try:
                codes, levels = pd.factorize(column)
            except TypeError:  # unhashable values: lists or dicts in a Parquet column
                codes = None
            if codes is not None:
                self.levels[column.name] = np.asarray([str(v) for v in levels], dtype=object)
                return np.where(codes < 0, np.nan, codes.astype(np.float64))
        raise DataError(f"dataset={self.name}: the column {column.name!r} of {self.path} holds {dtype} values, which "
                        "dlrun cannot encode (numbers, booleans and text are encoded).",
                        "Leave it out with dataset.features=[...], or convert it in the file (e.g. a date to a number).")

    # --- the fitted preprocessing --------------------------------------------------------------
    def fit_transform(self, x: Rows, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.preprocessing is None:
            self.preprocessing = self.fit(x, y)
        return self.transform(x, y)

    def fit(self, x: Rows, y: np.ndarray) -> dict[str, Any]:
        """The preprocessing's state, from the training split `x`, `y` only."""

        def fit_column(j: int) -> dict[str, Any]:
            # the split's values of column j, contiguous (`_encode`'s column-major table holds a column in one run)
            column = x.array[:, j]
            name, values = self.features[j], np.ascontiguousarray(column) if x.index is None else column[x.index]
            present = values[~np.isnan(values)]
            if len(present) == 0:
                raise DataError(f"dataset={self.name}: the column {name!r} has no value in the training split, so "
                                "there is nothing to fill its missing values with.",
                                "Leave it out with dataset.features=[...].")
            if name not in self.levels:
                fill = float(np.median(present, overwrite_input=True))  # `present` is this column's own copy
                filled = np.where(np.isnan(values), fill, values)
                mean, std = (float(filled.mean()), float(filled.std())) if self.standardize else (0.0, 1.0)
                return {"name": name, "kind": "numeric", "fill": fill, "mean": mean, "std": std if std > 1e-12 else 1.0}
            levels = self.levels[name]
            counts = np.bincount(present.astype(np.int64), minlength=len(levels))
            seen = np.nonzero(counts)[0]
            if len(seen) > self.max_categories:
                raise DataError(f"dataset={self.name}: the text column {name!r} has {len(seen):,} distinct values in the "
                                f"training split, more than dataset.max_categories = {self.max_categories} (one input "
                                "feature each).", f"Leave it out with dataset.features=[...], or raise "
                                f"dataset.max_categories (to at least {len(seen)}) if each value means something.")
            return {"name": name, "kind": "categorical", "fill": str(levels[int(np.argmax(counts))]),
                    "categories": sorted(str(v) for v in levels[seen])}

        columns = in_threads(fit_column, range(len(self.features)))
        state: dict[str, Any] = {"format": FORMAT, "task": self.task, "target": self.target,
                                 "class_names": list(self.target_classes), "columns": columns}
        if self.task == "regression":
            mean, std = (float(y.mean()), float(y.std())) if self.standardize_target else (0.0, 1.0)
            state.update(target_mean=mean, target_std=std if std > 1e-12 else 1.0)
        return state

    def transform(self, x: Rows, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        state = self.preprocessing
        try:
            return self._apply(state, x, y)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise DataError(f"dataset={self.name}: the run's preprocessing.json does not fit {self.path} "
                            f"({type(err).__name__}: {err}).", "Evaluate on the data the run was trained on, with its "
                            "config; or train the run again.") from err

    def _apply(self, state: dict[str, Any], x: Rows, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        columns = state["columns"]
        if [c["name"] for c in columns] != self.features:
            raise ValueError(f"it was fitted on the columns {[c['name'] for c in columns]}, not {self.features}")
        widths = [1 if c["kind"] == "numeric" else len(c["categories"]) for c in columns]
        starts = np.cumsum([0, *widths[:-1]])
        out = new_array(len(x), sum(widths), torch.float32, zeros=True)  # the one-hot blocks need only their ones
        numeric = [j for j, c in enumerate(columns) if c["kind"] == "numeric"]
        fill, mean, std = (np.array([float(columns[j][k]) for j in numeric]) for k in ("fill", "mean", "std"))
        categorical = [j for j, c in enumerate(columns) if c["kind"] == "categorical"]
        # per text column, this file's value index -> column of `out` (-1: a value never seen in training,
        # all zeros), its last entry for a missing value (the fill's); all of them end to end in `lookup`
        lookups = []
        for j in categorical:
            position = {str(c): starts[j] + k for k, c in enumerate(columns[j]["categories"])}
            levels = self.levels[columns[j]["name"]]
            lookups.append(np.array([position.get(v, -1) for v in levels] + [position.get(columns[j]["fill"], -1)]))
        lookup = np.concatenate([*lookups, np.zeros(0, dtype=np.int64)]).astype(np.int64)
        first = np.cumsum([0, *map(len, lookups)])[:-1]  # where each column's lookup begins in `lookup`
        missing_code = np.array([len(table) - 1 for table in lookups], dtype=np.float64)
        rows = max(1, BLOCK_BYTES // max(1, out[:1].nbytes))

        def block(start: int) -> None:
            # rows start..stop written straight into `out`, column by column while they are in cache; the same
            # arithmetic, element by element, as the whole split at once, so the values do not depend on blocks
            stop = min(len(x), start + rows)
            # these rows of `load()`'s inputs (the split itself is never copied whole)
            encoded = x.array[start:stop] if x.index is None else x.array[x.index[start:stop]]
            if numeric:
                values = encoded[:, numeric]
                np.copyto(values, np.broadcast_to(fill, values.shape), where=np.isnan(values))
                values -= mean
                values /= std
                out[start:stop, starts[numeric]] = values
            if categorical:
                codes = encoded[:, categorical]
                np.copyto(codes, np.broadcast_to(missing_code, codes.shape), where=np.isnan(codes))
                hot = lookup[codes.astype(np.int64) + first]  # (rows, text columns): a column of `out`, or -1
                flat = hot + np.arange(start, stop)[:, None] * out.shape[1]  # positions in out's flat buffer
                out.reshape(-1)[flat[hot >= 0]] = 1.0

        in_threads(block, range(0, len(x), rows))
        if state["task"] == "regression":
            y = (y - float(state["target_mean"])) / float(state["target_std"])
        return out, y
