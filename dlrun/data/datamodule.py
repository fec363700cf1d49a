"""Data sets: tensors on the training device batched by index, or streamed from host memory when they do not fit.

Every data set subclasses `InMemoryDataModule` and implements `load()`. The base class does the rest the
same way for all of them: a deterministic train/val/test split from the data seed (stratified for
classification), an optional cap on the training size, a data set's own preprocessing and normalization,
both fitted on the training split only, the DataSpec, and batching.

Batching takes one of two paths (`dataset.in_memory`; `auto` picks by `dataset.memory_budget`). In memory:
the splits are tensors on the training device, drawn by index without a DataLoader (no worker processes,
no per-sample Python, no host-to-device copy per batch). Streamed: the splits stay on the host as loaded
(a memory-mapped cache stays on disk, its rows read as batches need them), and a DataLoader's workers
convert and normalize each batch, which Lightning moves to the device. Both draw the same indices in the same order (`BatchOrder`) and apply the
same float32 operations to each sample, so the same seed gives the same metrics on either path.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytorch_lightning as pl
import torch

from dlrun.data.spec import DataSpec
from dlrun.data.split import cut as seeded_cut
from dlrun.errors import DataError
from dlrun.training.grouping import Group

EVAL_BATCH_SIZE = 1024  # validation/test batches: metrics are sums, so the size only changes speed
STATS_CHUNK_ELEMENTS = 1 << 20  # per step of the normalization statistics (8 MB of float64): bounded memory
DEFAULT_BUDGET_FRACTION = 0.5  # of the training device's free memory, when dataset.memory_budget is null


@dataclass
class Arrays:
    """What `load()` returns: inputs and targets, and official test (and validation) splits where they exist.

    With `x_test`, only the validation split is cut from `x`; with `x_val` too, nothing is cut (text cut
    into contiguous regions, XOR's four points), and `x` is the training split as it is; with `x_val`
    alone, only the test split is cut from `x`.
    """

    x: np.ndarray  # or rows of the data set's own kind that its preprocess reads (a table's `Columns`)
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None


class BatchOrder:
    """The indices of an epoch's batches: the one order both batching paths follow.

    With `shuffle` (training), each epoch uses a permutation drawn from (seed, epoch), so a resumed run
    sees the same batches as an uninterrupted one. Under DDP each rank takes every world-th index of the
    same permutation; training drops the remainder so that every rank runs the same number of steps.
    Training also drops a last batch of one sample after full ones: batch norm cannot train on it.
    Iterating yields one index tensor per batch, so it serves as a DataLoader's sampler with batch_size=None.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.rank, self.world_size = rank, world_size

    def indices(self) -> torch.Tensor:
        n = self.n
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch())
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            if self.shuffle:  # equal step counts on every rank keep the gradient all-reduce in step
                order = order[: n - n % self.world_size]
            order = order[self.rank :: self.world_size]
        return order

    def __len__(self) -> int:
        """Batches per epoch (on this rank)."""
        n = self.n
        if self.world_size > 1:
            n = n // self.world_size if self.shuffle else len(range(self.rank, n, self.world_size))
        if self.shuffle and n > self.batch_size and n % self.batch_size == 1:
            return n // self.batch_size  # the sample left over waits for the next epoch's permutation
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self.indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size]


class IndexBatches:
    """An iterable of (x, y) batches drawn by index from tensors (on the training device), in `BatchOrder`;
    `widen` (the data set's, if any) turns each batch's stored inputs into the network's."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                 widen: Callable[[torch.Tensor], torch.Tensor] | None = None, **order):
        self.x, self.y, self.widen = x, y, widen
        self.order = BatchOrder(len(x), batch_size, shuffle, **order)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order.indices().to(self.x.device)
        size = self.order.batch_size
        for start in range(0, len(self) * size, size):
            index = order[start : start + size]
            x = self.x[index]
            yield (x if self.widen is None else self.widen(x)), self.y[index]


class Rows:
    """Some rows of an array (all of them with `index` None), read only when asked. Rows of a memory-mapped
    file (an image cache, an .npy) are read from the file with pread, not through the map: a page fault maps
    a whole folio of the page cache around each row, so reading batches through the map would grow the
    process by up to the file's size, where reads leave the bytes in the kernel's cache only."""

    def __init__(self, array: np.ndarray, index: np.ndarray | None = None):
        self.array, self.index = array, index
        self.file = _file_rows(array)  # (path, byte offset of row 0), or None: an array in memory

    def __len__(self) -> int:
        return len(self.array) if self.index is None else len(self.index)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    def take(self, positions: np.ndarray | slice) -> np.ndarray:
        """The rows at `positions` (of this selection), copied into memory."""
        if self.file is None:
            return np.array(self.array[positions] if self.index is None else self.array[self.index[positions]])
        rows = np.arange(len(self))[positions] if self.index is None else self.index[positions]
        out = np.empty((len(rows), *self.sample_shape), dtype=self.array.dtype)
        if len(rows) == 0:
            return out
        path, start = self.file
        row_bytes = out[0].nbytes
        with open(path, "rb", buffering=0) as file:
            if rows[-1] - rows[0] + 1 == len(rows) and np.all(np.diff(rows) == 1):  # a run: one read
                reads = [(memoryview(out).cast("B"), start + int(rows[0]) * row_bytes)]
            else:
                reads = [(memoryview(out[k]).cast("B"), start + int(rows[k]) * row_bytes) for k in np.argsort(rows)]
            for buffer, offset in reads:
                if os.preadv(file.fileno(), [buffer], offset) != len(buffer):
                    raise DataError(f"{path} ended before the rows it should hold: it changed while in use.",
                                    "Run again; a cache is rebuilt when its files change.")
        return out

    def whole(self) -> np.ndarray:
        """Every row, for the in-memory path; a read-only map is copied (torch converts writable arrays only)."""
        rows = np.asarray(self.array) if self.index is None else self.array[self.index]
        return rows if rows.flags.writeable else np.array(rows)


def _file_rows(array: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset of its first row) when `array` is C-contiguous rows of a np.memmap (np.load's
    mmap_mode, or a slice of one); None otherwise."""
    root = array
    while root is not None and not (isinstance(root, np.memmap) and isinstance(root.base, mmap.mmap)):
        root = getattr(root, "base", None)
    if root is None or root.filename is None or not array.flags.c_contiguous:
        return None
    return root.filename, root.offset + array.ctypes.data - root.ctypes.data


class StreamedSplit(torch.utils.data.Dataset):
    """One split on the host; item `positions` (a batch of indices from BatchOrder) is that batch as tensors,
    converted and normalized as the in-memory path converts and normalizes the whole split."""

    def __init__(self, x: Rows, y: np.ndarray, to_tensors: Callable, norm: tuple[torch.Tensor, torch.Tensor] | None,
                 widen: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.x, self.y, self.to_tensors, self.norm, self.widen = x, y, to_tensors, norm, widen

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = positions.numpy()
        x, y = self.to_tensors(self.x.take(positions), self.y[positions])
        if self.norm is not None:  # in place: x is this batch's own copy, and a fresh batch-sized tensor costs page faults
            x.sub_(self.norm[0]).div_(self.norm[1])
        return (x if self.widen is None else self.widen(x)), y


class InMemoryDataModule(pl.LightningDataModule):
    """Base class of every data set (held in memory when it fits, else streamed). Subclasses set `task` and
    implement `load()`."""

    task: ClassVar[str] = "multiclass"
    integer_inputs: ClassVar[bool] = False  # token indices: kept as integers, never normalized
    pixel_inputs: ClassVar[bool] = False  # uint8 pixels: scaled to [0, 1] split by split
    #: the range the inputs can take (digits: 0 to 16), which unit_inputs maps to [0, 1]; None: pixels are
    #: [0, 1] already, other inputs are scaled with the training split's range, per feature (per channel)
    value_range: ClassVar[tuple[float, float] | None] = None
    #: a data set that stores its inputs narrower than the network takes them (a table's text column as one
    #: code instead of one 0/1 feature per value) widens each batch with this, where the batch is drawn; it
    #: scales its inputs itself (the normalization here would apply to the stored rows)
    widen: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(
        self,
        batch_size: int = 64,
        n_train: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        normalize: bool = True,
        seed: int = 0,
        split_seed: int | None = None,
        name: str | None = None,
        in_memory: bool | str = "auto",
        memory_budget: float | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        self.in_memory = in_memory
        self.memory_budget = memory_budget
        self.num_workers = num_workers
        self.batch_size = batch_size
        self.n_train = n_train
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.normalize = normalize
        self.seed = seed  # the run's: the order of the training batches
        # generated data, the split and n_train's subset; fixed apart from the run's seed, members of a seed
        # ensemble share one test split
        self.data_seed = seed if split_seed is None else split_seed
        self.name = name or type(self).__name__.lower()
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.spec: DataSpec | None = None
        self.norm_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        # set by run.py for the generative models, whose samples are probabilities: inputs are scaled to [0, 1]
        # by the training split's minimum and maximum, whatever `normalize` says, instead of standardized
        self.preprocessing: dict | None = None
        self.notes: dict = {}  # what loading found (skipped files, a cache hit), printed and put in summary.json
        # the device whose free memory sets the default budget; run.py sets it before prepare()
        self.device = torch.device("cpu")
        # how batches are made: {mode: "in memory" | "streamed", reason, bytes, budget}, set by prepare()
        self.data_path: dict | None = None
        self.streamed: dict[str, tuple[Rows, np.ndarray]] = {}  # the splits on the host, when streaming
        self.evaluate_train = False  # trainer.train_eval (run.py sets it): the validation loop also measures train
        # the input tasks' scaling (run.py sets it before prepare() for a model that sets its task, an
        # autoencoder's or a VAE's): inputs in [0, 1], the scale of their Bernoulli likelihood and of the
        # pictures, instead of standardized; dataset.normalize does not apply
        self.unit_inputs = False

    # --- what a subclass provides -------------------------------------------------------------
    def load(self) -> Arrays:
        raise NotImplementedError

    def preprocess(self, splits: dict[str, tuple[Rows, np.ndarray]]) -> dict[str, tuple[Rows, np.ndarray]]:
        """Fit the data set's own preprocessing on the training split (into `self.preprocessing`, unless
        one was given) and apply it to every split; `splits` is `_split`'s, the training split first, each
        the rows of `load()`'s inputs, not yet copied out. The default has none."""
        return splits

    def transform(self, x: Rows, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply the preprocessing of `preprocess` to new inputs (dlrun-predict's)."""
        return x.whole(), y

    def make_spec(self, x_train: torch.Tensor, arrays: Arrays) -> DataSpec:
        """The DataSpec; the default covers classification (one output per class) and scalar regression."""
        input_shape = tuple(x_train.shape[1:])
        if self.task == "regression":
            y = np.asarray(arrays.y)
            return DataSpec(self.name, "regression", input_shape, 1 if y.ndim == 1 else y.shape[1])
        if self.task == "binary":
            return DataSpec(self.name, "binary", input_shape, 1, arrays.class_names)
        n_classes = len(arrays.class_names) or int(np.max(arrays.y)) + 1
        names = arrays.class_names or tuple(str(i) for i in range(n_classes))
        return DataSpec(self.name, "multiclass", input_shape, n_classes, names)

    # --- the shared pipeline ------------------------------------------------------------------
    def prepare(self) -> DataSpec:
        """Load, split, preprocess, choose the batching path, normalize and describe the data. Idempotent;
        called before the model is built."""
        if self.spec is not None:
            return self.spec
        arrays = self.load()
        host = self.preprocess(self._split(arrays))
        self.data_path = self._choose_path(host)
        fit_scaling = self._scaling()
        if self.data_path["mode"] == "streamed":
            x_train, y_train = host["train"]
            if fit_scaling:
                self.norm_stats = fit_scaling(
                    len(x_train), lambda a, b: self._tensors(x_train.take(slice(a, b)), y_train[a:b])[0])
            self.streamed = host
            self.spec = self.make_spec(self._widened(torch.empty((0, *x_train.sample_shape))), arrays)
            return self.spec
        parts = {k: self._tensors(x.whole(), y) for k, (x, y) in host.items()}
        if fit_scaling:
            x_train = parts["train"][0]
            self.norm_stats = fit_scaling(len(x_train), lambda a, b: x_train[a:b])
        if self.norm_stats is not None:
            mean, std = self.norm_stats
            parts = {k: ((x - mean) / std, y) for k, (x, y) in parts.items()}
        self.splits = parts
        self.spec = self.make_spec(self._widened(parts["train"][0][:0]), arrays)
        return self.spec

    def prepare_inputs(self, x: np.ndarray) -> torch.Tensor:
        """New inputs, as `load()` gives them, transformed and normalized as the validation split was
        (after `prepare`): dlrun-predict's way to feed a trained network."""
        placeholder = np.zeros(len(x), dtype=np.int64 if self.task == "multiclass" else np.float32)  # no targets
        inputs, _ = self._tensors(*self.transform(Rows(x), placeholder))
        return self._widened(self._normalized(inputs))

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_stats is None:
            return x
        mean, std = self.norm_stats
        return (x - mean) / std

    def _widened(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.widen is None else self.widen(x)

    def _choose_path(self, host: dict[str, tuple[Rows, np.ndarray]]) -> dict:
        """In memory or streamed, and why: dataset.in_memory, or (auto) whether the splits' tensors fit the budget."""
        x_bytes = 8 if self.integer_inputs else 4
        y_bytes = 8 if self.task == "multiclass" else 4
        per_sample = x_bytes * int(np.prod(host["train"][0].sample_shape)) + y_bytes * int(
            np.prod(host["train"][1].shape[1:]))
        total = per_sample * sum(len(x) for x, _ in host.values())
        if self.in_memory is True:
            return {"mode": "in memory", "reason": "dataset.in_memory=true", "bytes": total, "budget": None}
        if self.memory_budget is not None:
            budget, where = int(self.memory_budget), "dataset.memory_budget"
        else:
            budget = int(free_memory(self.device) * DEFAULT_BUDGET_FRACTION)
            where = f"half the free memory of the {'GPU' if self.device.type == 'cuda' else 'host'}"
        if self.in_memory is False:
            mode, reason = "streamed", "dataset.in_memory=false"
        elif total <= budget:
            mode, reason = "in memory", f"{_size(total)} fit the budget, {_size(budget)} ({where})"
        else:
            mode, reason = "streamed", f"{_size(total)} exceed the budget, {_size(budget)} ({where})"
        batch_size = min(self.batch_size, len(host["train"][0]))
        batch = per_sample * batch_size
        if mode == "streamed" and batch > budget:
            raise DataError(
                f"dataset={self.name}: one batch of {batch_size} samples takes {_size(batch)}, more than the "
                f"memory budget of {_size(budget)} ({where}).",
                "Raise dataset.memory_budget (bytes), or lower dataset.batch_size.")
        return {"mode": mode, "reason": reason, "bytes": total, "budget": budget}

    def use_preprocessing(self, fitted: dict) -> None:
        """Apply `fitted` (a run's saved `preprocessing`) instead of fitting: dlrun-eval's way to transform
        the data exactly as the run did."""
        self.preprocessing = fitted

    def _split(self, arrays: Arrays) -> dict[str, tuple[Rows, np.ndarray]]:
        """{split: (its rows of the inputs, its targets)}: the inputs are not copied (a memory map stays one)."""
        classification = self.task in ("multiclass", "binary")
        x, y = arrays.x, np.asarray(arrays.y)  # x as given: a memory map stays one (a table's `Columns` too)
        idx = np.arange(len(x))

        def cut(index: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
            if fraction == 0:  # dataset.val_fraction=0: no validation split, every sample trains
                return index, index[:0]
            return seeded_cut(index, fraction, self.data_seed, y[index] if classification else None)

        if arrays.x_val is not None and arrays.x_test is not None:
            train_idx = idx
            val = (Rows(arrays.x_val), np.asarray(arrays.y_val))
            test = (Rows(arrays.x_test), np.asarray(arrays.y_test))
        elif arrays.x_val is not None:
            train_idx, test_idx = cut(idx, self.test_fraction)
            val = (Rows(arrays.x_val), np.asarray(arrays.y_val))
            test = (Rows(x, np.sort(test_idx)), y[np.sort(test_idx)])
        elif arrays.x_test is not None:
            train_idx, val_idx = cut(idx, self.val_fraction)
            val = (Rows(x, np.sort(val_idx)), y[np.sort(val_idx)])
            test = (Rows(arrays.x_test), np.asarray(arrays.y_test))
        else:
            rest, test_idx = cut(idx, self.test_fraction)
            train_idx, val_idx = cut(rest, self.val_fraction / (1.0 - self.test_fraction))
            val = (Rows(x, np.sort(val_idx)), y[np.sort(val_idx)])
            test = (Rows(x, np.sort(test_idx)), y[np.sort(test_idx)])
        if self.n_train is not None and self.n_train < len(train_idx):
            train_idx = np.random.default_rng(self.data_seed).permutation(train_idx)[: self.n_train]
        train_idx = np.sort(train_idx)
        if len(train_idx) == len(x):  # all of x: its rows as they are (a memory map is not read)
            return {"train": (Rows(x), y), "val": val, "test": test}
        return {"train": (Rows(x, train_idx), y[train_idx]), "val": val, "test": test}

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x_t = torch.as_tensor(x, dtype=torch.long if self.integer_inputs else torch.float32)
        y_t = torch.as_tensor(y, dtype=torch.float32 if self.task != "multiclass" else torch.long)
        if self.pixel_inputs:  # split by split, so the whole set never exists as float32 twice
            x_t.div_(255.0)
        return x_t, y_t

    def _scaling(self) -> Callable | None:
        """What fits `norm_stats` (an offset and a scale, x -> (x - offset) / scale) on the training split: the
        range to [0, 1] (unit_inputs), the standardization (dataset.normalize), or nothing (token indices)."""
        if self.integer_inputs:
            return None
        if self.unit_inputs:
            return self._fit_unit_range
        return self._fit_normalization if self.normalize else None

    def _fit_unit_range(
        self, n: int, rows: Callable[[int, int], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(low, high - low) mapping the inputs to [0, 1]: the data set's `value_range`, else (pixels excepted,
        already there) the training split's minimum and maximum per channel (images) or per feature."""
        if self.value_range is not None:
            low, high = self.value_range
            return torch.tensor(low, dtype=torch.float32), torch.tensor(high - low, dtype=torch.float32)
        if self.pixel_inputs:
            return None
        first = rows(0, 1)
        dims = (0, 2, 3) if first.dim() == 4 else tuple(range(first.dim() - 1))
        step = max(1, STATS_CHUNK_ELEMENTS // max(1, first[0].numel()))
        low, high = None, None
        for start in range(0, n, step):
            chunk = rows(start, min(n, start + step))
            chunk_low, chunk_high = chunk.amin(dim=dims, keepdim=True), chunk.amax(dim=dims, keepdim=True)
            low = chunk_low if low is None else torch.minimum(low, chunk_low)
            high = chunk_high if high is None else torch.maximum(high, chunk_high)
        spread = high - low
        return low, torch.where(spread > 1e-8, spread, torch.ones_like(spread))

    @staticmethod
    def _fit_normalization(n: int, rows: Callable[[int, int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std per channel (images) or per feature (sequences, flat), from training data only.

        `rows(a, b)` gives training inputs a..b as float32; they are summed chunk by chunk in float64 (Chan's
        parallel update), so that memory stays bounded and both batching paths get the same statistics."""
        first = rows(0, 1)
        if first.dim() == 4:  # (N, C, H, W): one statistic per channel
            dims, shape = (0, 2, 3), (1, first.shape[1], 1, 1)
        else:  # (N, F) or (N, T, F): one statistic per feature
            dims, shape = tuple(range(first.dim() - 1)), (1,) * (first.dim() - 1) + (first.shape[-1],)
        step = max(1, STATS_CHUNK_ELEMENTS // max(1, first[0].numel()))
        count, mean, m2 = 0, torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
        for start in range(0, n, step):
            chunk = rows(start, min(n, start + step)).to(torch.float64)
            chunk_count = chunk.numel() // mean.numel()
            chunk_mean = chunk.mean(dim=dims).reshape(shape)
            chunk_m2 = chunk.sub_(chunk_mean).pow_(2).sum(dim=dims).reshape(shape)
            total = count + chunk_count
            delta = chunk_mean - mean
            mean = mean + delta * chunk_count / total
            m2 = m2 + chunk_m2 + delta**2 * count * chunk_count / total
            count = total
        std = (m2 / (count - 1)).sqrt() if count > 1 else torch.full(shape, float("nan"), dtype=torch.float64)
        mean, std = mean.float(), std.float()
        return mean, torch.where(std > 1e-8, std, torch.ones_like(std))

    # --- Lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

    def split_size(self, split: str) -> int:
        return len(self.streamed[split][0]) if self.streamed else len(self.splits[split][0])

    def inputs(self, split: str, n: int) -> torch.Tensor:
        """The first `n` inputs of `split` as the network sees them, on the host, on either path."""
        if not self.streamed:
            return self._widened(self.splits[split][0][:n]).cpu()
        x, y = self.streamed[split]
        return StreamedSplit(x, y, self._tensors, self.norm_stats, self.widen)[torch.arange(min(n, len(x)))][0]

    def labels(self, split: str, n: int) -> torch.Tensor:
        """The targets of `inputs(split, n)`, on the host."""
        if not self.streamed:
            return self.splits[split][1][:n].cpu()
        return torch.as_tensor(self.streamed[split][1][:n])

    def _batches(self, split: str, shuffle: bool, batch_size: int | None = None) -> IndexBatches | torch.utils.data.DataLoader:
        """A split's batches on its path; `batch_size` None: dataset.batch_size to train, at least EVAL_BATCH_SIZE
        to evaluate."""
        trainer = self.trainer
        batch_size = batch_size or (self.batch_size if shuffle else max(self.batch_size, EVAL_BATCH_SIZE))
        order = {
            "seed": self.seed,
            "epoch": (lambda: trainer.current_epoch) if trainer is not None else (lambda: 0),
            "rank": trainer.global_rank if trainer is not None else 0,
            "world_size": trainer.world_size if trainer is not None else 1,
        }
        if not self.streamed:
            x, y = self.splits[split]
            return IndexBatches(x, y, batch_size, shuffle=shuffle, widen=self.widen, **order)
        x, y = self.streamed[split]
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return torch.utils.data.DataLoader(
            StreamedSplit(x, y, self._tensors, self.norm_stats, self.widen),
            sampler=BatchOrder(len(x), batch_size, shuffle, **order),
            batch_size=None,  # each index the sampler yields is a whole batch's indices
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=self.num_workers > 0,
        )

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """In memory, batches are drawn from tensors already on the device (see setup): nothing to move, and no
        walk through a group of them per training_step call (dlrun/training/grouping.py). Streamed batches
        come from the host and move as Lightning moves any batch (from pinned memory, without waiting), those
        of a training group each as the group draws it, so the copy of one overlaps the training on the last."""
        if not self.streamed:
            return batch
        move = super().transfer_batch_to_device
        if isinstance(batch, Group):
            return batch.each(lambda one: move(one, device, dataloader_idx))
        return move(batch, device, dataloader_idx)

    def train_dataloader(self) -> IndexBatches | torch.utils.data.DataLoader:
        return self._batches("train", shuffle=True)

    def validation_splits(self) -> tuple[str, ...]:
        """The splits the validation loop measures, in order: `val`, unless dataset.val_fraction=0 left it empty,
        and with `evaluate_train` the training split (unshuffled, in evaluation batches)."""
        return (*(("val",) if self.split_size("val") else ()), *(("train",) if self.evaluate_train else ()))

    def val_dataloader(self) -> IndexBatches | torch.utils.data.DataLoader | list:
        loaders = [self._batches(split, shuffle=False) for split in self.validation_splits()]
        return loaders[0] if len(loaders) == 1 else loaders  # one loader: Lightning's steps get no dataloader_idx

    def test_dataloader(self) -> IndexBatches | torch.utils.data.DataLoader:
        return self._batches("test", shuffle=False)

    def eval_loader(self, split: str) -> IndexBatches | torch.utils.data.DataLoader:
        """`split` in batches of EVAL_BATCH_SIZE, for a Trainer this data module is not attached to (dlrun-eval)."""
        return self._batches(split, shuffle=False, batch_size=EVAL_BATCH_SIZE)


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's free memory, or the host's available RAM (/proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _size(n: float) -> str:
    """Bytes for a person: 512 B, 3.2 MB, 1.5 GB."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"

