"""dlrun's seeded cut draws exactly what scikit-learn's train_test_split draws, on any labels."""

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from dlrun.data.split import cut


def sklearn_cut(index, fraction, seed, labels):
    """The reference: train_test_split, stratified under the same rule as `cut` (two per class, room for each)."""
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        n_small = int(round(len(index) * fraction))
        if counts.min() < 2 or not len(counts) <= n_small <= len(index) - len(counts):
            labels = None
    return train_test_split(index, test_size=fraction, random_state=seed, stratify=labels)


@pytest.mark.parametrize("case", range(400))
def test_cut_draws_what_train_test_split_draws(case):
    rng = np.random.default_rng(case)
    n = int(rng.integers(2, 3000))
    kind = case % 4  # balanced classes, a rare class, string labels, no labels
    labels = (rng.integers(0, int(rng.integers(1, 12)), n) if kind == 0 else
              (rng.random(n) < 0.03).astype(np.int64) if kind == 1 else
              np.array(["cat", "dog", "eel"])[rng.integers(0, 3, n)] if kind == 2 else None)
    index = np.sort(rng.choice(10 * n, n, replace=False))
    fraction = float(rng.choice([0.05, 0.1, 0.15, 0.2, 0.5, 0.15 / 0.85, 0.9]))
    seed = int(rng.integers(0, 1000))
    try:
        expected = sklearn_cut(index, fraction, seed, labels)
    except ValueError as err:  # too few samples for the fraction: the same refusal
        with pytest.raises(ValueError) as refused:
            cut(index, fraction, seed, labels)
        assert str(refused.value) == str(err)
        return
    got = cut(index, fraction, seed, labels)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs)
    assert sorted(np.concatenate(got)) == list(index)
