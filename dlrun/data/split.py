"""The seeded cut of a data set into two parts: scikit-learn's `train_test_split`, draw for draw, in numpy.

scikit-learn's stratified split gathers each class's indices into Python lists, which takes most of a
second on a million rows (a third of the time a million-row table takes to prepare). `cut` makes the
same random draws in the same order from the same generator and concatenates arrays instead, so every
data set is split exactly as `train_test_split(index, test_size=fraction, random_state=seed,
stratify=labels)` splits it (tests/test_split.py compares the two).
"""

from __future__ import annotations

from math import ceil

import numpy as np
from sklearn.model_selection import train_test_split

# the per-class counts scikit-learn's stratified split draws
from sklearn.utils.extmath import _approximate_mode


def cut(index: np.ndarray, fraction: float, seed: int, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the rest, `fraction` of `index`) drawn with `seed`. With `labels` (one per entry of `index`), each class
    in the same proportion on both sides, where that can be: two samples of each class at least, and room for
    every class on both sides; otherwise the labels are not used."""
    classes, inverse, counts = (None, None, None) if labels is None else np.unique(labels, return_inverse=True,
                                                                                   return_counts=True)
    n_small = int(round(len(index) * fraction))
    if labels is None or counts.min() < 2 or not len(classes) <= n_small <= len(index) - len(classes):
        return tuple(train_test_split(index, test_size=fraction, random_state=seed))
    n_test = ceil(fraction * len(index))
    if min(n_test, len(index) - n_test) < len(classes):
        return tuple(train_test_split(index, test_size=fraction, random_state=seed, stratify=labels))  # its refusal
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_train = _approximate_mode(counts, len(index) - n_test, rng)
    n_held = _approximate_mode(counts - n_train, n_test, rng)
    train, test = [], []
    for members, k_train, k_test in zip(by_class, n_train, n_held, strict=True):
        drawn = members[rng.permutation(len(members))]
        train.append(drawn[:k_train])
        test.append(drawn[k_train:k_train + k_test])
    train, test = rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
    return index[train], index[test]
