"""Data sets that ship with scikit-learn: nothing to download, so they work on any machine."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
from sklearn import datasets as skdatasets
from sklearn.utils import Bunch

from dlrun.data.datamodule import Arrays, InMemoryDataModule


class Digits(InMemoryDataModule):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), as images of shape (1, 8, 8)."""

    task = "multiclass"
    value_range = (0.0, 16.0)  # pixel intensities 0..16

    def load(self) -> Arrays:
        bunch = skdatasets.load_digits()
        x = bunch.images.astype(np.float32)[:, None, :, :]
        return Arrays(x, bunch.target.astype(np.int64), class_names=tuple(str(c) for c in bunch.target_names))


class SklearnTable(InMemoryDataModule):
    """A table of features from one of scikit-learn's bundled loaders: flat inputs of shape (F,)."""

    loader: ClassVar[Callable[[], Bunch]]

    def load(self) -> Arrays:
        bunch = type(self).loader()
        names = tuple(str(c) for c in bunch.target_names)
        return Arrays(bunch.data.astype(np.float32), bunch.target.astype(np.int64), class_names=names)


class Iris(SklearnTable):
    """Fisher's iris: 150 flowers, 4 measurements, 3 species."""

    loader = staticmethod(skdatasets.load_iris)


class Wine(SklearnTable):
    """UCI wine recognition: 178 wines, 13 chemical measurements, 3 cultivars."""

    loader = staticmethod(skdatasets.load_wine)


class BreastCancer(SklearnTable):
    """Wisconsin diagnostic breast cancer: 569 tumours, 30 features; binary, 1 = benign (357 of 569)."""

    task = "binary"
    loader = staticmethod(skdatasets.load_breast_cancer)
