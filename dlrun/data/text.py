"""A character-level language model on any text file: predict every next character of a window.

The vocabulary is the set of characters in the file. The text is cut into three contiguous regions,
in order: training (the first 1 - val_fraction - test_fraction of the characters), validation, test.
Windows are taken inside each region, so no validation or test character is ever seen in training
(random windows would overlap their neighbours across the split). Inputs are token indices (N, T);
targets are the same windows shifted by one character (N, T), scored at every step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dlrun.data.datamodule import Arrays, InMemoryDataModule
from dlrun.data.spec import DataSpec
from dlrun.errors import DataError


class Text(InMemoryDataModule):
    """Windows of `window` characters of the file at `path`, every `stride` characters (default: window)."""

    task = "multiclass"
    integer_inputs = True

    def __init__(self, path: str | None = None, window: int = 64, stride: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.path = path
        self.window = window
        self.stride = stride or window

    def read_text(self) -> str:
        hint = "Point dataset.path at a UTF-8 text file: dlrun dataset=text dataset.path=corpus.txt"
        if self.path is None:
            raise DataError(f"dataset={self.name} needs a text file, and dataset.path is not set.", hint)
        path = Path(self.path).expanduser()
        if path.exists() and not path.is_file():  # a FIFO would block, a device like /dev/zero never end
            raise DataError(f"dataset={self.name}: {path} is not a regular file (a directory, a pipe or a device) "
                            "(dataset.path).", hint)
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise DataError(f"dataset={self.name}: no file at {path.resolve()} (dataset.path).", hint) from err
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"dataset={self.name}: cannot read {path.resolve()} as UTF-8 text: {err}", hint) from err

    def load(self) -> Arrays:
        text = self.read_text()
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        ids = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
        n = len(ids)
        n_val, n_test = int(n * self.val_fraction), int(n * self.test_fraction)
        regions = {
            "train": ids[: n - n_val - n_test],
            "val": ids[n - n_val - n_test : n - n_test],
            "test": ids[n - n_test :],
        }
        windows = {}
        for split, region in regions.items():
            if len(region) < self.window + 1 and not (split == "val" and n_val == 0):  # val_fraction=0: none
                raise DataError(
                    f"dataset={self.name}: the {split} part of {self.path} has {len(region)} characters, fewer than "
                    f"dataset.window + 1 = {self.window + 1}: the file has {n} characters in all.",
                    "Use a longer text, a smaller dataset.window, or other dataset.val_fraction/test_fraction.",
                )
            windows[split] = self.windows(region)
        (x, y), (x_val, y_val), (x_test, y_test) = windows.values()
        return Arrays(x, y, x_test, y_test, class_names=tuple(vocab), x_val=x_val, y_val=y_val)

    def windows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs ids[s : s+T] and targets ids[s+1 : s+T+1] for s = 0, stride, 2·stride, …"""
        starts = np.arange(0, len(ids) - self.window, self.stride)
        offsets = starts[:, None] + np.arange(self.window)[None, :]
        return ids[offsets], ids[offsets + 1]

    def make_spec(self, x_train: torch.Tensor, arrays: Arrays) -> DataSpec:
        vocab = len(arrays.class_names)
        return DataSpec(
            self.name, "multiclass", (self.window, vocab), vocab, arrays.class_names, per_step=True, vocab_size=vocab
        )
