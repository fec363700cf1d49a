"""A user's table (CSV, TSV or Parquet): one column is the target, the others become flat features.

Loading turns each feature column into one array of numbers (`Columns`): numeric and boolean columns
as float64 with NaN where a value is missing, text (and categorical) columns as the index of each value
among the file's distinct values (-1: missing). The split is drawn on those rows, and the preprocessing is fitted
on the training split only (`fit_transform`): a missing value becomes the training median (numeric)
or the most frequent training value (text); numeric columns are standardized with the training mean
and std (with the unit inputs of an autoencoder or VAE: mapped to [0, 1] by the training minimum and
range, held in the same two fields); a text column becomes one 0/1 feature per value seen in training,
and a value never seen there (only in validation or test) becomes all zeros. The fitted state is plain
JSON (`self.preprocessing`), saved as the run's `preprocessing.json` and applied as saved by dlrun-eval.

Parsing a large CSV is most of a first load, so its parsed columns are kept under `cache_dir` (`TableCache`;
files of `cache_min_mb` or more): a later load of the unchanged file (a sweep's other jobs, dlrun-eval) reads
them instead of parsing.

The splits are held compact, one float32 per column: a numeric column's transformed value, a text
column's index among its training categories (-1: a value training never saw). `OneHot` widens each
batch where it is drawn (on the training device, or in a streaming loader's workers), so a text column
of 30 values costs 4 bytes a row in memory instead of 120, and the wide table is never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dlrun.data.datamodule import Arrays, InMemoryDataModule, Rows
from dlrun.data.spec import DataSpec
from dlrun.data.targets import check_task, encode_target
from dlrun.errors import DataError, UserError
from dlrun.rundir import write_atomic

FORMAT = 2  # of preprocessing.json; 1 (before 2): unit inputs were scaled after it, by the training range
PARQUET_SUFFIXES = (".parquet", ".pq")
CACHE_FORMAT = 1  # part of the cache key: a new layout never reads an old file


def new_array(rows: int, columns: int, dtype: torch.dtype) -> np.ndarray:
    """A new, uninitialized rows x columns array, allocated by torch. NumPy asks the kernel for
    transparent huge pages for any array of 4 MB or more (madvise); where the kernel then compacts memory on
    demand to find them (THP defrag=madvise, its default), the first touch of a large array on a busy
    machine waits for that: measured here, two to three seconds of system time for the 1.3 GB of a
    million-row table's outputs. torch does not ask."""
    return torch.empty((rows, columns), dtype=dtype).numpy()


def threads() -> ThreadPoolExecutor:
    """A few threads for work column by column: numpy and pandas release the GIL in the long loops
    (copies, arithmetic, sorting, hashing), so columns proceed in parallel."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def in_threads(work, items) -> list:
    """`[work(item) for item in items]` on `threads()`. The first item (in order) to raise raises, as in
    the plain loop."""
    with threads() as pool:
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


class TableCache:
    """Parsed tables on disk, one file each under `folder`, named by a hash of the table's path, size,
    modification time and inode and of the pandas version that parsed it. A number column is kept as pandas
    read it (float64, int64 or bool); a text column as each value's index among its distinct values (int32,
    -1: missing), those values in the record, and it is served as a pandas Categorical of them, which the
    encoding turns into codes without hashing the text again. A cache is checked before it is used (the
    record, written last, holds each column's place, type and CRC-32, and a checksum of itself): a damaged
    one is rebuilt, never trusted, and it holds raw numbers and JSON only, so reading it cannot run code.

    A file modified within `RECENT_S` seconds of being read is not cached: file systems stamp times from a
    coarse clock, so a rewrite within the same tick could keep the size and time that name the cache."""

    RECENT_S = 2.0
    NUMBER_DTYPES = ("float64", "int64", "bool")
    ALIGN = 64  # bytes: each column starts on a cache line of the file
    DAMAGED = (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError)  # what reading a damaged one raises

    def __init__(self, folder: Path, min_bytes: float):
        self.folder, self.min_bytes = folder, min_bytes
        self.writing: Future | None = None

    def frame(self, path: Path, read) -> tuple[pd.DataFrame, str | None]:
        """(the table at `path`, what the cache did, or None where the file is too small to cache it);
        `read(path)` parses the file where the cache does not hold it."""
        before = path.stat()
        if before.st_size < self.min_bytes or path.suffix.lower() in PARQUET_SUFFIXES:
            return read(path), None
        recent = time.time_ns() - before.st_mtime_ns < self.RECENT_S * 1e9
        key = hashlib.sha256(f"{CACHE_FORMAT}\n{path.resolve()}\n{before.st_size}\n{before.st_mtime_ns}\n"
                             f"{before.st_ino}\n{pd.__version__}\n".encode()).hexdigest()[:24]
        data, record = self.folder / f"{path.stem}-{key}.bin", self.folder / f"{path.stem}-{key}.json"
        found = data.exists() or record.exists()
        if found:
            try:
                return self.load(data, record), "read"
            except self.DAMAGED:
                pass  # damaged: parsed again and rewritten below
        frame = read(path)
        after = path.stat()
        if recent or (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino):
            return frame, "not written (the file was modified within seconds of being read)"
        columns = self.columns(frame)
        if isinstance(columns, str):
            return frame, f"not written ({columns})"
        # written on a thread of its own while the caller goes on with the table; `finish()` waits for it
        pool = ThreadPoolExecutor(max_workers=1)
        self.writing = pool.submit(self.write, columns, data, record, path)
        pool.shutdown(wait=False)  # its thread ends after the write
        return frame_of(columns), "rebuilt (the old one was damaged)" if found else "built"

    def finish(self) -> str | None:
        """Wait for the cache being written, if any: None once written, or why it was not (disk full, no
        permission)."""
        writing, self.writing = self.writing, None
        try:
            writing and writing.result()
        except OSError as err:
            return f"not written ({err})"
        return None

    @staticmethod
    def columns(frame: pd.DataFrame) -> dict[str, tuple[np.ndarray, list[str] | None]] | str:
        """{name: (values, None) for a number column, (codes, values) for a text one}, or why `frame` cannot be
        cached (a column of another type)."""
        for name, dtype in frame.dtypes.items():
            if not (isinstance(dtype, pd.StringDtype) or str(dtype) in TableCache.NUMBER_DTYPES):
                return f"the column {name!r} holds {dtype} values"

        def kept(name: str) -> tuple[np.ndarray, list[str] | None]:
            column = frame[name]
            if isinstance(column.dtype, pd.StringDtype):
                codes, levels = pd.factorize(column)
                return codes.astype(np.int32), [str(v) for v in levels]
            return column.to_numpy(), None

        return dict(zip(frame.columns, in_threads(kept, frame.columns), strict=True))

    def write(self, columns: dict[str, tuple[np.ndarray, list[str] | None]], data: Path, record: Path, source: Path) -> None:
        """The columns into `data` (under a temporary name, then renamed), then their `record`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = data.with_name(f".{data.name}.{os.getpid()}.tmp")
        entries, offset = [], 0
        try:
            with open(tmp, "wb") as handle:
                for name, (values, levels) in columns.items():
                    raw = memoryview(np.ascontiguousarray(values)).cast("B")
                    handle.write(raw)
                    pad = -len(raw) % self.ALIGN
                    handle.write(bytes(pad))
                    entry = {"name": name, "dtype": str(values.dtype), "offset": offset, "crc32": zlib.crc32(raw)}
                    entries.append(entry if levels is None else {**entry, "levels": levels})
                    offset += len(raw) + pad
            os.replace(tmp, data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        body = {"format": CACHE_FORMAT, "source": str(source), "rows": len(next(iter(columns.values()))[0]),
                "columns": entries}
        write_atomic(record, json.dumps({**body, "check": _checksum(body)}) + "\n")

    def load(self, data: Path, record: Path) -> pd.DataFrame:
        """The table a cache holds, its columns memory-mapped; ValueError (or another of `DAMAGED`) if any part
        of it does not check out: the checksums catch damage, the checks of each field a record written to
        mislead."""
        meta = json.loads(record.read_text())
        if meta.pop("check", None) != _checksum(meta):
            raise ValueError("a record whose text changed")
        if (meta["format"] != CACHE_FORMAT or not isinstance(meta["rows"], int) or meta["rows"] < 1
                or not isinstance(meta["columns"], list) or not meta["columns"]):
            raise ValueError("not a table cache of this dlrun")
        mapped = np.memmap(data, mode="r", dtype=np.uint8)
        columns = {}
        for entry in meta["columns"]:
            levels = entry.get("levels")
            dtype = np.dtype("int32" if levels is not None else entry["dtype"])
            if str(dtype) != entry["dtype"] or (levels is None and entry["dtype"] not in self.NUMBER_DTYPES):
                raise ValueError(f"a column of type {entry['dtype']!r}")
            start = entry["offset"]
            end = start + meta["rows"] * dtype.itemsize
            if not isinstance(start, int) or start < 0 or start % self.ALIGN or end > len(mapped):
                raise ValueError("a column outside the file")
            values = mapped[start:end].view(dtype)
            if zlib.crc32(values) != entry["crc32"]:
                raise ValueError("a column whose bytes changed")
            if levels is not None and not (isinstance(levels, list) and all(isinstance(v, str) for v in levels)):
                raise ValueError("a text column without its values")
            columns[str(entry["name"])] = (np.asarray(values), levels)
        return frame_of(columns)


def _checksum(record: dict) -> int:
    return zlib.crc32(json.dumps(record, sort_keys=True).encode())


def frame_of(columns: dict[str, tuple[np.ndarray, list[str] | None]]) -> pd.DataFrame:
    """A DataFrame of `TableCache.columns`, number columns not copied, text columns as Categoricals (a code
    out of range, or repeated values, raise ValueError)."""
    return pd.DataFrame({name: values if levels is None else pd.Categorical.from_codes(values, pd.Index(levels, dtype="str"))
                         for name, (values, levels) in columns.items()}, copy=False)


class Columns:
    """A table's feature columns as `load()` gives them, one array each (see the module's docstring), taken
    from pandas without copying where they are float64 already. Only their number of rows matters to the
    split, so `load()` hands them over while they are still being encoded on threads of their own (the
    split is drawn meanwhile): `column(j)` waits for column j. The preprocessing gathers a split's values
    column by column, so no table of them is written."""

    def __init__(self, columns: list[Future | np.ndarray], rows: int):
        self._columns = columns
        self.shape = (rows, len(columns))

    def column(self, j: int) -> np.ndarray:
        """Column j, encoded (an error encoding it raises here)."""
        if isinstance(self._columns[j], Future):
            self._columns[j] = self._columns[j].result()
        return self._columns[j]

    @property
    def arrays(self) -> list[np.ndarray]:
        return [self.column(j) for j in range(self.shape[1])]

    def encoded(self) -> Columns:
        """These columns, each encoded (the first error encoding one raises here)."""
        for j in range(self.shape[1]):
            self.column(j)
        return self

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> Columns:
        arrays = [a[rows] for a in self.arrays]
        return Columns(arrays, len(arrays[0]))


class OneHot:
    """Compact rows (see the module's docstring) -> the network's inputs: each numeric column copied to its
    place, a 1 at each text column's place plus its category index, zeros elsewhere. Its index tensors are
    kept per device."""

    def __init__(self, state: dict[str, Any]):
        columns = state["columns"]
        widths = [1 if c["kind"] == "numeric" else len(c["categories"]) for c in columns]
        starts = np.cumsum([0, *widths[:-1]])
        self.width = int(sum(widths))
        numeric = [j for j, c in enumerate(columns) if c["kind"] == "numeric"]
        text = [j for j, c in enumerate(columns) if c["kind"] == "categorical"]
        self.indices = {name: torch.tensor(np.asarray(v, dtype=np.int64)) for name, v in (
            ("numeric", numeric), ("numeric_at", starts[numeric]), ("text", text), ("text_at", starts[text]))}
        self.on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        at = self.on.get(x.device)
        if at is None:
            at = self.on[x.device] = {k: v.to(x.device) for k, v in self.indices.items()}
        out = x.new_zeros((len(x), self.width))
        if len(at["text"]):
            codes = x[:, at["text"]].long()
            seen = codes >= 0
            # a value training never saw (-1) adds 0 at column 0, which changes nothing; one row's text
            # columns have places of their own, so each 1 lands once
            out.scatter_add_(1, torch.where(seen, codes + at["text_at"], 0), seen.to(x.dtype))
        out[:, at["numeric_at"]] = x[:, at["numeric"]]
        return out


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
        cache_dir: str | None = "data/table_cache",
        cache_min_mb: float = 16,
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
        if isinstance(cache_min_mb, bool) or not isinstance(cache_min_mb, (int, float)) or not cache_min_mb >= 0:
            raise UserError(f"dataset.cache_min_mb = {cache_min_mb!r}: expected a number >= 0 (megabytes)")
        self.missing = missing
        self.max_categories = max_categories
        self.cache = None if cache_dir is None else TableCache(Path(cache_dir).expanduser(), cache_min_mb * 1e6)
        self.standardize = normalize
        self.standardize_target = standardize_target
        self.levels: dict[str, np.ndarray] = {}  # a text column's distinct values, by index, in this file
        self.target_classes: tuple[str, ...] = ()
        self._one_hot: tuple[dict, OneHot] | None = None  # (the preprocessing it was built from, it)

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

    def parsed(self) -> pd.DataFrame:
        """dataset.path's table: from the cache where it holds this file, else read (and cached if large)."""
        if self.cache is None:
            return self.read()
        path = require_file(self.path, self.name, "path", "dataset.path=houses.csv dataset.target=price")
        frame, note = self.cache.frame(path, self.read)
        if note:
            self.notes["cache"] = note
        return frame

    def prepare(self) -> DataSpec:
        """The shared pipeline; a cache written meanwhile (while the split and the preprocessing ran) is waited
        for before it returns, so that no thread outlives the preparation."""
        try:
            return super().prepare()
        finally:
            failed = self.cache and self.cache.finish()
            if failed:
                self.notes["cache"] = failed

    def load(self) -> Arrays:
        frame = self.parsed()
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
            gaps = [int(np.count_nonzero(np.isnan(a) if a.dtype.kind == "f" else a < 0)) for a in x.arrays]
            if any(gaps):
                named = ", ".join(f"{name!r} ({n:,})" for name, n in zip(features, gaps, strict=True) if n)
                raise DataError(f"dataset={self.name}: {self.path} has missing values in the columns {named}.",
                                "Fill them in the file, or set dataset.missing=impute (median / most frequent value).")
        given = self.preprocessing
        # text labels as Arrow strings (as pandas reads them; from the cache, its codes' values): encoded there,
        # not as a million Python strings
        if isinstance(labels.dtype, pd.CategoricalDtype) and isinstance(labels.cat.categories.dtype, pd.StringDtype):
            values = labels.cat.categories.array.take(labels.cat.codes.to_numpy())
        else:
            values = labels.array if isinstance(labels.dtype, pd.StringDtype) else labels.to_numpy()
        target = encode_target(values, given["task"] if given else self.task_setting,
                               f"the target column {self.target!r}", tuple(given["class_names"]) if given else None)
        self.task, self.target_classes = target.task, target.class_names
        return Arrays(x, target.y, class_names=target.class_names)

    def _encode(self, frame: pd.DataFrame) -> Columns:
        """The feature columns of `frame` as numbers (see `_encode_column`), being encoded on threads."""
        pool = threads()
        encoding = [pool.submit(self._encode_column, frame[name]) for name in self.features]
        pool.shutdown(wait=False)  # its threads finish the columns, then end
        return Columns(encoding, len(frame))

    def encode_new(self, frame: pd.DataFrame, where: str) -> Columns:
        """New rows (`where`: the files they come from) encoded like the training file's, for `transform`
        after `prepare`: every feature column must be there, numeric ones still numeric; extra columns
        (the target, ids) are ignored."""
        self.require_features(frame, where)
        kinds = {c["name"]: c["kind"] for c in self.preprocessing["columns"]}
        frame = frame.copy()
        for name in self.features:  # a text column read as numbers (or as all empty) still matches by its text
            if kinds[name] == "categorical":
                frame[name] = frame[name].astype(object).where(frame[name].isna(), frame[name].astype(str))
        x = self._encode(frame).encoded()  # all of them: `self.levels` complete
        now_text = sorted(name for name in self.levels if kinds.get(name) == "numeric")
        if now_text:
            raise DataError(f"{where}: the column(s) {', '.join(map(repr, now_text))} hold text, but were numbers in "
                            "training.", "Give numbers there (an empty value is filled as in training).")
        return x

    def require_features(self, frame: pd.DataFrame, where: str) -> None:
        """A DataError naming the feature columns `frame` (read from `where`) lacks, if any."""
        missing = [f for f in self.features if f not in frame.columns]
        if missing:
            raise DataError(f"{where} lacks the column(s) {', '.join(map(repr, missing))}, which the run was trained "
                            f"on; it needs all of: {', '.join(self.features)}.",
                            "Add them (an empty value is filled as in training); names are case-sensitive.")

    def _encode_column(self, column: pd.Series) -> np.ndarray:
        """One column as numbers: numeric and boolean as float64 (NaN: missing), text as value indices (-1)."""
        dtype = column.dtype
        if dtype == np.float64:
            return column.to_numpy()  # pandas' own array (read only): not copied
        if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype):
            return column.to_numpy(dtype=np.float64, na_value=np.nan)
        if pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype):
            try:
                codes, levels = pd.factorize(column)
            except TypeError:  # unhashable values: lists or dicts in a Parquet column
                codes = None
            if codes is not None:
                self.levels[column.name] = np.asarray([str(v) for v in levels], dtype=object)
                return codes
        raise DataError(f"dataset={self.name}: the column {column.name!r} of {self.path} holds {dtype} values, which "
                        "dlrun cannot encode (numbers, booleans and text are encoded).",
                        "Leave it out with dataset.features=[...], or convert it in the file (e.g. a date to a number).")

    # --- the fitted preprocessing --------------------------------------------------------------
    # Column by column, on threads (`_transformed`): each split's values of a column are gathered once from
    # its array in `Columns`, fitted on (the training split's) and written transformed.
    def preprocess(self, splits: dict[str, tuple[Rows, np.ndarray]]) -> dict[str, tuple[Rows, np.ndarray]]:
        if self.preprocessing is not None:
            return {part: (Rows(x), y) for part, (x, y) in self._apply(splits).items()}
        columns, out = self._transformed({part: rows for part, (rows, _) in splits.items()},
                                         lambda j, values: self._fit_column(self.features[j], values))
        state: dict[str, Any] = {"format": FORMAT, "task": self.task, "target": self.target,
                                 "class_names": list(self.target_classes), "columns": columns}
        if self.task == "regression":
            y = splits["train"][1]
            mean, std = (float(y.mean()), float(y.std())) if self.standardize_target else (0.0, 1.0)
            state.update(target_mean=mean, target_std=std if std > 1e-12 else 1.0)
        self.preprocessing = state
        return {part: (Rows(out[part]), self._target(state, y)) for part, (_, y) in splits.items()}

    def transform(self, x: Rows, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._apply({"new": (x, y)})["new"]

    def _apply(self, parts: dict[str, tuple[Rows, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each part's (rows, targets) transformed by the given (saved) preprocessing."""
        state = self.preprocessing
        try:
            columns = state["columns"]
            if [c["name"] for c in columns] != self.features:
                raise ValueError(f"it was fitted on the columns {[c['name'] for c in columns]}, not {self.features}")
            if self.unit_inputs and state.get("format") != FORMAT:
                raise ValueError(f"it is of format {state.get('format')}, whose unit inputs this dlrun would not "
                                 "scale as they were trained")
            targets = {part: self._target(state, y) for part, (_, y) in parts.items()}
            _, out = self._transformed({part: rows for part, (rows, _) in parts.items()}, lambda j, _values: columns[j])
            return {part: (out[part], targets[part]) for part in parts}
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise DataError(f"dataset={self.name}: the run's preprocessing.json does not fit {self.path} "
                            f"({type(err).__name__}: {err}).", "Evaluate on the data the run was trained on, with its "
                            "config; or train the run again.") from err

    def _scaling(self) -> None:
        """None: the preprocessing scales the numeric columns (to [0, 1] for unit inputs), and one-hot
        columns are 0/1 already."""
        return None

    @property
    def widen(self) -> OneHot | None:
        """The fitted (or given) preprocessing's OneHot, built once per preprocessing."""
        if self.preprocessing is None:
            return None
        if self._one_hot is None or self._one_hot[0] is not self.preprocessing:
            self._one_hot = (self.preprocessing, OneHot(self.preprocessing))
        return self._one_hot[1]

    def _transformed(self, x: dict[str, Rows], column_state) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
        """(each column's state, each part's compact rows) of the parts `x` (the first one fitted on): on
        threads, one per column, column j's values of each part are gathered once, the first part's given
        to `column_state(j, values)` (the fitted state, or the saved one), and each written transformed by
        it into its part's column-major buffer; one transposing copy each turns those into rows."""
        out = {part: new_array(len(self.features), len(rows), torch.float32) for part, rows in x.items()}

        def one(j: int) -> dict[str, Any]:
            column = None
            for part, rows in x.items():
                values = self._gather(rows, j)
                column = column_state(j, values) if column is None else column
                self._write_column(column, values, out[part][j])
            return column

        return in_threads(one, range(len(self.features))), {part: _rows(buffer) for part, buffer in out.items()}

    @staticmethod
    def _gather(x: Rows, j: int) -> np.ndarray:
        """The split's values of column j, as its own copy."""
        column = x.array.column(j)
        return np.array(column) if x.index is None else column[x.index]

    def _fit_column(self, name: str, values: np.ndarray) -> dict[str, Any]:
        """Column `name`'s state from its training values."""
        text = name in self.levels
        present = values[values >= 0] if text else values[~np.isnan(values)]
        n, missing = len(present), len(values) - len(present)
        if n == 0:
            raise DataError(f"dataset={self.name}: the column {name!r} has no value in the training split, so "
                            "there is nothing to fill its missing values with.", "Leave it out with dataset.features=[...].")
        if text:
            levels = self.levels[name]
            counts = np.bincount(present, minlength=len(levels))
            seen = np.nonzero(counts)[0]
            if len(seen) > self.max_categories:
                raise DataError(f"dataset={self.name}: the text column {name!r} has {len(seen):,} distinct values in the "
                                f"training split, more than dataset.max_categories = {self.max_categories} (one input "
                                "feature each).", f"Leave it out with dataset.features=[...], or raise "
                                f"dataset.max_categories (to at least {len(seen)}) if each value means something.")
            return {"name": name, "kind": "categorical", "fill": str(levels[int(np.argmax(counts))]),
                    "categories": sorted(str(v) for v in levels[seen])}
        middle = (n - 1) // 2
        present.partition(middle)  # one k: numpy's partition is several times slower given two
        fill = float(present[middle] if n % 2 else (present[middle] + present[middle + 1:].min()) / 2)
        if self.unit_inputs:  # to [0, 1]; the median fill lies between
            mean, std = float(present.min()), float(present.max() - present.min())
        elif self.standardize:  # of the filled values: the present ones and `missing` times the fill
            mean = (float(present.sum()) + missing * fill) / len(values)
            deviations = present - mean
            std = float(np.sqrt((float(np.einsum("i,i", deviations, deviations)) + missing * (fill - mean) ** 2) / len(values)))
        else:
            mean, std = 0.0, 1.0
        return {"name": name, "kind": "numeric", "fill": fill, "mean": mean, "std": std if std > 1e-12 else 1.0}

    def _write_column(self, column: dict[str, Any], values: np.ndarray, out: np.ndarray) -> None:
        """`values` (a split's, from `_gather`) transformed by the column's state into `out`: a numeric value
        filled and scaled, a text value's index among the column's categories (-1: never seen in training)."""
        if column["kind"] == "numeric":
            np.copyto(values, float(column["fill"]), where=np.isnan(values))
            values -= float(column["mean"])
            np.divide(values, float(column["std"]), out=out, casting="same_kind")  # float32, as it is written
            return
        position = {str(c): k for k, c in enumerate(column["categories"])}
        levels = self.levels[column["name"]]
        # this file's value index -> category index; the extra last entry, for a missing value, the fill's
        lookup = np.array([position.get(v, -1) for v in levels] + [position.get(column["fill"], -1)], dtype=np.float32)
        np.take(lookup, values, out=out)  # a missing value's index, -1, takes the last entry

    @staticmethod
    def _target(state: dict[str, Any], y: np.ndarray) -> np.ndarray:
        if state["task"] == "regression":
            return (y - float(state["target_mean"])) / float(state["target_std"])
        return y


def _rows(columns: np.ndarray) -> np.ndarray:
    """A column-major buffer (one row per column) as rows: one transposing copy, by torch on every core."""
    return torch.from_numpy(columns).T.contiguous().numpy()
