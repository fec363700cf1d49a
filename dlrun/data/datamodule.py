"""In-memory data: tensors on the training device, batched by index with a fresh permutation per epoch.

Every data set that fits in memory subclasses `InMemoryDataModule` and implements `load()`. The base
class does the rest the same way for all of them: a deterministic train/val/test split from the data seed
(stratified for classification), an optional cap on the training size, a data set's own preprocessing
and normalization, both fitted on the training split only, the DataSpec, and batching without a DataLoader (no worker processes, no
per-sample Python, no host-to-device copy per batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split

from dlrun.data.spec import DataSpec

EVAL_BATCH_SIZE = 1024  # validation/test batches: metrics are sums, so the size only changes speed


@dataclass
class Arrays:
    """What `load()` returns: inputs and targets, and official test (and validation) splits where they exist.

    With `x_test`, only the validation split is cut from `x`; with `x_val` too, nothing is cut (text cut
    into contiguous regions, XOR's four points), and `x` is the training split as it is; with `x_val`
    alone, only the test split is cut from `x`.
    """

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None


class IndexBatches:
    """An iterable of (x, y) batches drawn from tensors by index.

    With `shuffle` (training), each epoch uses a permutation drawn from (seed, epoch), so a resumed run
    sees the same batches as an uninterrupted one. Under DDP each rank takes every world-th index of the
    same permutation; training drops the remainder so that every rank runs the same number of steps.
    Training also drops a last batch of one sample after full ones: batch norm cannot train on it.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.rank, self.world_size = rank, world_size

    def _indices(self) -> torch.Tensor:
        n = len(self.x)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch())
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            if self.shuffle:  # equal step counts on every rank keep the gradient all-reduce in step
                order = order[: n - n % self.world_size]
            order = order[self.rank :: self.world_size]
        return order.to(self.x.device)

    def __len__(self) -> int:
        """Batches per epoch (on this rank)."""
        n = len(self.x)
        if self.world_size > 1:
            n = n // self.world_size if self.shuffle else len(range(self.rank, n, self.world_size))
        if self.shuffle and n > self.batch_size and n % self.batch_size == 1:
            return n // self.batch_size  # the sample left over waits for the next epoch's permutation
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x[index], self.y[index]


class InMemoryDataModule(pl.LightningDataModule):
    """Base class of every in-memory data set. Subclasses set `task` and implement `load()`."""

    task: ClassVar[str] = "multiclass"
    integer_inputs: ClassVar[bool] = False  # token indices: kept as integers, never normalized
    pixel_inputs: ClassVar[bool] = False  # uint8 pixels: scaled to [0, 1] split by split

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
    ):
        super().__init__()
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
        # fit_transform's fitted state, as plain JSON data (None: the data set has no preprocessing of its
        # own). Set before prepare(), it is applied as given instead of fitted: see use_preprocessing.
        self.preprocessing: dict | None = None
        self.notes: dict = {}  # what loading found (skipped files, a cache hit), printed and put in summary.json

    # --- what a subclass provides -------------------------------------------------------------
    def load(self) -> Arrays:
        raise NotImplementedError

    def fit_transform(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fit the data set's own preprocessing on the training split (into `self.preprocessing`, unless
        one was given) and apply it to that split. The default has none."""
        return x, y

    def transform(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply the preprocessing of `fit_transform` to a validation or test split."""
        return x, y

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
        """Load, split, normalize and describe the data. Idempotent; called before the model is built."""
        if self.spec is not None:
            return self.spec
        arrays = self.load()
        raw = self._split(arrays)
        parts = {"train": self._tensors(*self.fit_transform(*raw.pop("train")))}
        parts.update({k: self._tensors(*self.transform(x, y)) for k, (x, y) in raw.items()})
        if self.normalize and not self.integer_inputs:
            self.norm_stats = self._fit_normalization(parts["train"][0])
            parts = {k: (self._normalized(x), y) for k, (x, y) in parts.items()}
        self.splits = parts
        self.spec = self.make_spec(parts["train"][0], arrays)
        return self.spec

    def prepare_inputs(self, x: np.ndarray) -> torch.Tensor:
        """New inputs, as `load()` gives them, transformed and normalized as the validation split was
        (after `prepare`): dlrun-predict's way to feed a trained network."""
        placeholder = np.zeros(len(x), dtype=np.int64 if self.task == "multiclass" else np.float32)  # no targets
        inputs, _ = self._tensors(*self.transform(x, placeholder))
        return self._normalized(inputs)

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_stats is None:
            return x
        mean, std = self.norm_stats
        return (x - mean) / std

    def use_preprocessing(self, fitted: dict) -> None:
        """Apply `fitted` (a run's saved `preprocessing`) instead of fitting: dlrun-eval's way to transform
        the data exactly as the run did."""
        self.preprocessing = fitted

    def _split(self, arrays: Arrays) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        classification = self.task in ("multiclass", "binary")
        x, y = np.asarray(arrays.x), np.asarray(arrays.y)
        idx = np.arange(len(x))

        def cut(index: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
            labels = y[index] if classification and _can_stratify(y[index], fraction) else None
            return train_test_split(index, test_size=fraction, random_state=self.data_seed, stratify=labels)

        if arrays.x_val is not None and arrays.x_test is not None:
            train_idx = idx
            val = (np.asarray(arrays.x_val), np.asarray(arrays.y_val))
            test = (np.asarray(arrays.x_test), np.asarray(arrays.y_test))
        elif arrays.x_val is not None:
            train_idx, test_idx = cut(idx, self.test_fraction)
            val = (np.asarray(arrays.x_val), np.asarray(arrays.y_val))
            test = (x[np.sort(test_idx)], y[np.sort(test_idx)])
        elif arrays.x_test is not None:
            train_idx, val_idx = cut(idx, self.val_fraction)
            val = (x[np.sort(val_idx)], y[np.sort(val_idx)])
            test = (np.asarray(arrays.x_test), np.asarray(arrays.y_test))
        else:
            rest, test_idx = cut(idx, self.test_fraction)
            train_idx, val_idx = cut(rest, self.val_fraction / (1.0 - self.test_fraction))
            val = (x[np.sort(val_idx)], y[np.sort(val_idx)])
            test = (x[np.sort(test_idx)], y[np.sort(test_idx)])
        if self.n_train is not None and self.n_train < len(train_idx):
            train_idx = np.random.default_rng(self.data_seed).permutation(train_idx)[: self.n_train]
        return {"train": (x[np.sort(train_idx)], y[np.sort(train_idx)]), "val": val, "test": test}

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x_t = torch.as_tensor(x, dtype=torch.long if self.integer_inputs else torch.float32)
        y_t = torch.as_tensor(y, dtype=torch.float32 if self.task != "multiclass" else torch.long)
        if self.pixel_inputs:  # split by split, so the whole set never exists as float32 twice
            x_t.div_(255.0)
        return x_t, y_t

    @staticmethod
    def _fit_normalization(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std per channel (images) or per feature (sequences, flat), from training data only."""
        if x.dim() == 4:  # (N, C, H, W): one statistic per channel
            dims, shape = (0, 2, 3), (1, x.shape[1], 1, 1)
        else:  # (N, F) or (N, T, F): one statistic per feature
            dims, shape = tuple(range(x.dim() - 1)), (1,) * (x.dim() - 1) + (x.shape[-1],)
        mean = x.mean(dim=dims).reshape(shape)
        std = x.std(dim=dims).reshape(shape)
        return mean, torch.where(std > 1e-8, std, torch.ones_like(std))

    # --- Lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

    def _batches(self, split: str, shuffle: bool) -> IndexBatches:
        x, y = self.splits[split]
        trainer = self.trainer
        return IndexBatches(
            x,
            y,
            self.batch_size if shuffle else max(self.batch_size, EVAL_BATCH_SIZE),
            shuffle=shuffle,
            seed=self.seed,
            epoch=(lambda: trainer.current_epoch) if trainer is not None else (lambda: 0),
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """Batches are drawn from tensors already on the device (see setup): nothing to move, and no walk
        through a group of them per training_step call (dlrun/training/grouping.py)."""
        return batch

    def train_dataloader(self) -> IndexBatches:
        return self._batches("train", shuffle=True)

    def val_dataloader(self) -> IndexBatches:
        return self._batches("val", shuffle=False)

    def test_dataloader(self) -> IndexBatches:
        return self._batches("test", shuffle=False)


def _can_stratify(labels: np.ndarray, fraction: float) -> bool:
    """Stratification needs at least two samples per class and room for every class on both sides."""
    _, counts = np.unique(labels, return_counts=True)
    n_small = int(round(len(labels) * fraction))
    return counts.min() >= 2 and len(counts) <= n_small <= len(labels) - len(counts)
