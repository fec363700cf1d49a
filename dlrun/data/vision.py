"""Image benchmarks (MNIST, Fashion-MNIST, CIFAR-10), read into memory from torchvision's on-disk layout.

torchvision downloads the files (`dataset.download=true`, with a network); dlrun reads them itself, so
that files put there by hand (copied from another machine, gzipped or not) work without a network and
without torchvision's checksums. The official test split is the test split; validation is cut from the
official training split (`dataset.val_fraction`; `test_fraction` does not apply). Pixels are scaled
to [0, 1], then standardized per channel with training statistics (`dataset.normalize`).
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np

from dlrun.data.datamodule import Arrays, InMemoryDataModule
from dlrun.errors import DataError


class VisionDataModule(InMemoryDataModule):
    """A torchvision data set: `folder` (under `root`) must hold `files`, or `download` fetches them."""

    task = "multiclass"
    pixel_inputs = True
    torchvision_name: ClassVar[str]  # the class in torchvision.datasets that downloads the files
    folder: ClassVar[str]  # where torchvision puts the files, relative to root
    files: ClassVar[tuple[str, ...]]
    alternatives: ClassVar[str] = ""  # how else a file may be named, for the error message

    def __init__(self, root: str, download: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.download = download

    @property
    def directory(self) -> Path:
        return self.root / self.folder

    def missing(self) -> list[str]:
        """The expected files that are not in `directory`."""
        return [name for name in self.files if self.find(name) is None]

    def find(self, name: str) -> Path | None:
        path = self.directory / name
        return path if path.is_file() else None

    def load(self) -> Arrays:
        reason = ""
        if self.missing() and self.download:
            reason = self._download()
        missing = self.missing()
        if missing:
            raise DataError(
                f"dataset={self.name}: {len(missing)} of its files are missing from {self.directory.resolve()}"
                f"{f' ({reason})' if reason else ''}.\n"
                f"Put these files there: {', '.join(self.files)}{self.alternatives}.",
                f"Either copy them there, set dataset.root=DIR to where they are (DIR/{self.folder}/...), "
                "or run with dataset.download=true on a machine with a network.",
            )
        try:
            return self.read()
        except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as err:
            raise DataError(
                f"dataset={self.name}: cannot read the files in {self.directory.resolve()}: {err}",
                "Replace them with intact copies, or delete them and run with dataset.download=true.",
            ) from err

    def _download(self) -> str:
        """Let torchvision fetch the files into `root`; return why it failed, or '' on success."""
        from torchvision import datasets  # imported here: only downloads need it

        try:
            getattr(datasets, self.torchvision_name)(str(self.root), train=True, download=True)
        except Exception as err:  # no network, a proxy, a full disk: all mean "put the files there yourself"
            return f"download failed: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        return ""

    def read(self) -> Arrays:
        raise NotImplementedError


class MNISTFamily(VisionDataModule):
    """28x28 grey images in IDX files (`<root>/<Name>/raw/`), 60,000 for training and 10,000 for test."""

    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    alternatives = " (each may also be gzipped, with the name ending in .gz)"
    class_names: ClassVar[tuple[str, ...]]

    def find(self, name: str) -> Path | None:
        for candidate in (self.directory / name, self.directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def read(self) -> Arrays:
        arrays = [read_idx(self.find(name)) for name in self.files]  # type: ignore[arg-type]
        x, y, x_test, y_test = arrays
        for images, labels in ((x, y), (x_test, y_test)):
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ValueError(f"images of shape {images.shape} do not match labels of shape {labels.shape}")
        return Arrays(
            x[:, None], y.astype(np.int64), x_test[:, None], y_test.astype(np.int64), class_names=self.class_names
        )


class MNIST(MNISTFamily):
    """LeCun's handwritten digits."""

    torchvision_name = "MNIST"
    folder = "MNIST/raw"
    class_names = tuple(str(i) for i in range(10))


class FashionMNIST(MNISTFamily):
    """Zalando's clothing images, a drop-in replacement of MNIST that is harder to classify."""

    torchvision_name = "FashionMNIST"
    folder = "FashionMNIST/raw"
    class_names = (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    )


class CIFAR10(VisionDataModule):
    """32x32 colour images of 10 classes, as the python pickle batches of `cifar-10-python.tar.gz`."""

    torchvision_name = "CIFAR10"
    folder = "cifar-10-batches-py"
    files = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
    class_names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

    def read(self) -> Arrays:
        train = [_unpickle(self.directory / name) for name in self.files[:-1]]
        test = _unpickle(self.directory / self.files[-1])
        x = np.concatenate([b["data"] for b in train]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in train])
        x_test = test["data"].reshape(-1, 3, 32, 32)
        y_test = np.asarray(test["labels"], dtype=np.int64)
        if len(x) != len(y) or len(x_test) != len(y_test):
            raise ValueError("the batches hold different numbers of images and labels")
        return Arrays(x, y, x_test, y_test, class_names=self.class_names)


# What a CIFAR batch's pickle may name: numpy's array and dtype reconstructors (numpy 1 and 2 spell the
# module differently) and the bytes codec of protocol-2 pickles. Dicts, lists, str, bytes and numbers
# need no name. Anything else (os.system, a class with __reduce__) would run code: refused.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which this file format never holds")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """A CIFAR batch, read without running code: only plain data and numpy arrays may be in it."""
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnlyUnpickler(f, encoding="latin1").load()  # the batches were written by Python 2
    except pickle.UnpicklingError as err:
        raise DataError(f"{path} is refused: {err} (loading it could run code).",
                        "Use the batches of the official cifar-10-python.tar.gz, or delete them and run with "
                        "dataset.download=true.") from err
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path.name} is not a CIFAR batch (a dict with data and labels)")
    try:
        return {"data": np.asarray(batch["data"], dtype=np.uint8), "labels": batch["labels"]}
    except TypeError as err:  # data that are not numbers
        raise ValueError(f"{path.name}: {err}") from err


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format): magic 0x0000 08 <ndim>, ndim big-endian sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = bytearray(f.read())  # writable: tensors made from it may be modified in place
    if len(data) < 4 or data[0:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 3:
        raise ValueError(f"{path.name} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path.name} holds {values.size} values, its header says {shape}")
    return values.reshape(shape)
