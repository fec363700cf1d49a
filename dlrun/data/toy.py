"""Toy problems the notes use to make a point: XOR, 2-D classification shapes, and sine regression.

All are generated from the data seed (`dataset.split_seed`, else the run's seed), so the same seed gives
the same points; `n_samples` sets the size. Inputs are flat vectors of shape (F,).
"""

from __future__ import annotations

import numpy as np
from sklearn import datasets as skdatasets

from dlrun.data.datamodule import Arrays, InMemoryDataModule

XOR_POINTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
XOR_LABELS = np.array([0, 1, 1, 0], dtype=np.int64)


class Xor(InMemoryDataModule):
    """XOR: no line separates the four points, so a linear model gets at most 3 of 4 right (75%).

    Each point appears `repeat` times with Gaussian `noise` (std) added. With `repeat=1` (the default)
    the four points are the training, validation and test split alike: there is nothing else to
    generalize to. With `repeat=R > 1` the 4R points are split as usual.
    """

    task = "binary"

    def __init__(self, repeat: int = 1, noise: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.repeat = repeat
        self.noise = noise

    def load(self) -> Arrays:
        names = ("0", "1")
        rng = np.random.default_rng(self.data_seed)
        x = np.tile(XOR_POINTS, (self.repeat, 1))
        x = (x + rng.normal(0.0, self.noise, size=x.shape)).astype(np.float32)
        y = np.tile(XOR_LABELS, self.repeat)
        if self.repeat == 1:
            return Arrays(x, y, x_test=x, y_test=y, x_val=x, y_val=y, class_names=names)
        return Arrays(x, y, class_names=names)


class Moons(InMemoryDataModule):
    """Two interleaving half circles (scikit-learn's make_moons); binary, inputs (2,)."""

    task = "binary"

    def __init__(self, n_samples: int = 1000, noise: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.n_samples = n_samples
        self.noise = noise

    def load(self) -> Arrays:
        x, y = skdatasets.make_moons(self.n_samples, noise=self.noise, random_state=self.data_seed)
        return Arrays(x.astype(np.float32), y.astype(np.int64), class_names=("upper", "lower"))


class Circles(InMemoryDataModule):
    """A circle inside another (scikit-learn's make_circles); `factor` is the inner radius. Binary, (2,)."""

    task = "binary"

    def __init__(self, n_samples: int = 1000, noise: float = 0.1, factor: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.n_samples = n_samples
        self.noise = noise
        self.factor = factor

    def load(self) -> Arrays:
        x, y = skdatasets.make_circles(self.n_samples, noise=self.noise, factor=self.factor, random_state=self.data_seed)
        return Arrays(x.astype(np.float32), y.astype(np.int64), class_names=("outer", "inner"))


class Spirals(InMemoryDataModule):
    """`arms` interleaved spirals of `turns` turns each, one class per arm; inputs (2,).

    Point i of an arm sits at radius r in (0, 1] and angle 2π(turns·r + arm/arms), plus Gaussian
    `noise`. Hard for shallow nets: the boundary winds around the origin.
    """

    task = "multiclass"

    def __init__(self, n_samples: int = 1000, noise: float = 0.05, arms: int = 2, turns: float = 1.5, **kwargs):
        super().__init__(**kwargs)
        self.n_samples = n_samples
        self.noise = noise
        self.arms = arms
        self.turns = turns

    def load(self) -> Arrays:
        rng = np.random.default_rng(self.data_seed)
        y = np.arange(self.n_samples) % self.arms
        r = rng.uniform(0.05, 1.0, size=self.n_samples)
        angle = 2 * np.pi * (self.turns * r + y / self.arms)
        x = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1)
        x = x + rng.normal(0.0, self.noise, size=x.shape)
        return Arrays(x.astype(np.float32), y.astype(np.int64), class_names=tuple(f"arm {i}" for i in range(self.arms)))


class Blobs(InMemoryDataModule):
    """Gaussian clusters, one class each (scikit-learn's make_blobs); `noise` is the clusters' std."""

    task = "multiclass"

    def __init__(self, n_samples: int = 1000, centers: int = 3, n_features: int = 2, noise: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.n_samples = n_samples
        self.centers = centers
        self.n_features = n_features
        self.noise = noise

    def load(self) -> Arrays:
        x, y = skdatasets.make_blobs(
            self.n_samples, n_features=self.n_features, centers=self.centers, cluster_std=self.noise,
            random_state=self.data_seed,
        )
        return Arrays(x.astype(np.float32), y.astype(np.int64))


class Sine(InMemoryDataModule):
    """Regression y = sin(2πx) + N(0, noise²), x ~ U(0, 1): the notes' curve-fitting example (004 §1.3).

    The inputs are the powers (x, x², …, x^degree), so a linear model (`model=mlp model.depth=0`) is a
    polynomial of that degree: degree 1 underfits, 3 fits, 9 on a few points overfits.
    """

    task = "regression"

    def __init__(self, n_samples: int = 200, noise: float = 0.2, degree: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.n_samples = n_samples
        self.noise = noise
        self.degree = degree

    def load(self) -> Arrays:
        rng = np.random.default_rng(self.data_seed)
        x = rng.uniform(0.0, 1.0, size=self.n_samples)
        y = np.sin(2 * np.pi * x) + rng.normal(0.0, self.noise, size=self.n_samples)
        powers = np.stack([x**k for k in range(1, self.degree + 1)], axis=1)
        return Arrays(powers.astype(np.float32), y.astype(np.float32))


class Ravine(InMemoryDataModule):
    """The notes' ravine (004 §6.2.2) as a regression whose loss is the quadratic L(w) = (0.1 w1)² + w2².

    The inputs are the four corners (±`scale`, ±1), each `repeat` times, and the targets y = w*·x (plus
    Gaussian `noise`) with w* = `optimum`. Over the balanced corners the cross terms cancel, so a linear
    model ŷ = w·x + b has the full-batch MSE (scale·(w1 − w1*))² + (w2 − w2*)² + b² exactly: curvature
    2·scale² along w1 against 2 along w2, a condition number of 1/scale². A minibatch mixes the corners
    unevenly, which adds gradient noise as in the notes' SGD example. Validation and test are the four
    noise-free corners once, so `val/loss` is L(w) itself. Standardizing the inputs would undo the
    ravine, so the config turns `normalize` off.
    """

    task = "regression"

    def __init__(self, repeat: int = 64, scale: float = 0.1, optimum=(10.0, 1.0), noise: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.repeat = repeat
        self.scale = scale
        self.optimum = np.asarray(optimum, dtype=np.float64)
        self.noise = noise

    def load(self) -> Arrays:
        corners = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=np.float64) * [self.scale, 1.0]
        x = np.tile(corners, (self.repeat, 1))
        noise = np.random.default_rng(self.data_seed).normal(0.0, self.noise, size=len(x))
        y = x @ self.optimum + noise
        x_corners, y_corners = corners.astype(np.float32), (corners @ self.optimum).astype(np.float32)
        return Arrays(x.astype(np.float32), y.astype(np.float32), x_test=x_corners, y_test=y_corners,
                      x_val=x_corners, y_val=y_corners)
