"""Synthetic sequence tasks for the notes' long-range-dependency claims (000 §8.7). Shapes are (T, F)."""

from __future__ import annotations

import numpy as np

from dlrun.data.datamodule import Arrays, InMemoryDataModule


class Adding(InMemoryDataModule):
    """The adding problem: T steps of (value ~ U(0, 1), marker); exactly two markers are 1.

    The target is the sum of the two marked values, one in each half of the sequence, so a model must
    carry information across about T/2 steps. Regression; predicting 1.0 always gives MSE ≈ 0.167.
    """

    task = "regression"

    def __init__(self, length: int = 20, n_samples: int = 4000, **kwargs):
        super().__init__(**kwargs)
        self.length = length
        self.n_samples = n_samples

    def load(self) -> Arrays:
        rng = np.random.default_rng(self.data_seed)
        n, t = self.n_samples, self.length
        values = rng.uniform(0.0, 1.0, size=(n, t)).astype(np.float32)
        half = max(t // 2, 1)
        first = rng.integers(0, half, size=n)
        second = rng.integers(half, t, size=n) if t > 1 else first
        markers = np.zeros((n, t), dtype=np.float32)
        markers[np.arange(n), first] = 1.0
        markers[np.arange(n), second] = 1.0
        x = np.stack([values, markers], axis=-1)
        y = (values * markers).sum(axis=1).astype(np.float32)
        return Arrays(x, y)


class Copy(InMemoryDataModule):
    """A memory task, many-to-one: name the symbol shown first, after `length` distractor steps.

    Each sequence has length + 1 steps of one-hot symbols from an alphabet of `symbols`; step 0 is the
    symbol to remember, steps 1..length are random symbols of the same alphabet (so the model cannot
    just look for the one non-blank step). The class is the first symbol: chance is 1/symbols, and only
    a model that carries it over `length` steps does better.
    """

    task = "multiclass"

    def __init__(self, length: int = 20, symbols: int = 8, n_samples: int = 4000, **kwargs):
        super().__init__(**kwargs)
        self.length = length
        self.symbols = symbols
        self.n_samples = n_samples

    def load(self) -> Arrays:
        rng = np.random.default_rng(self.data_seed)
        tokens = rng.integers(0, self.symbols, size=(self.n_samples, self.length + 1))
        x = np.eye(self.symbols, dtype=np.float32)[tokens]
        names = tuple(str(i) for i in range(self.symbols))
        return Arrays(x, tokens[:, 0].astype(np.int64), class_names=names)


class Parity(InMemoryDataModule):
    """Parity of `length` random bits, read one bit per step (shape (T, 1)); binary label = XOR of all bits.

    Every bit matters, so no shortcut exists: the model must carry the running parity to the end.
    """

    task = "binary"

    def __init__(self, length: int = 10, n_samples: int = 4000, **kwargs):
        super().__init__(**kwargs)
        self.length = length
        self.n_samples = n_samples

    def load(self) -> Arrays:
        rng = np.random.default_rng(self.data_seed)
        bits = rng.integers(0, 2, size=(self.n_samples, self.length))
        return Arrays(bits[..., None].astype(np.float32), bits.sum(axis=1) % 2, class_names=("even", "odd"))


class SineSeq(InMemoryDataModule):
    """Next-step forecasting: from a window of `length` values of a noisy sine, predict the next value.

    Each sample is its own stretch of s_t = sin(2π t / period + φ) + N(0, noise²) with a random phase φ;
    the inputs are s_0..s_{T-1} (shape (T, 1)), the target s_T. Regression; with noise > 0 the best
    possible MSE is noise².
    """

    task = "regression"

    def __init__(self, length: int = 20, period: float = 16.0, noise: float = 0.05, n_samples: int = 4000, **kwargs):
        super().__init__(**kwargs)
        self.length = length
        self.period = period
        self.noise = noise
        self.n_samples = n_samples

    def load(self) -> Arrays:
        rng = np.random.default_rng(self.data_seed)
        phase = rng.uniform(0.0, 2 * np.pi, size=(self.n_samples, 1))
        steps = np.arange(self.length + 1)[None, :]
        series = np.sin(2 * np.pi * steps / self.period + phase)
        series = series + rng.normal(0.0, self.noise, size=series.shape)
        return Arrays(series[:, :-1, None].astype(np.float32), series[:, -1].astype(np.float32))
