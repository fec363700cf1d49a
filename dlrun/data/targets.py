"""The labels of a user's data (a CSV column, an array): which task they pose, and their encoding.

Inference, overridden by `dataset.task`: floats are regression; integers with at most
MAX_INFERRED_CLASSES distinct values, booleans and strings are classes (two: binary, more: multiclass);
integers with more distinct values are regression. Classes are numbered in the sorted order of their
values, and their names are those values as text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dlrun.data.spec import TASKS
from dlrun.errors import DataError, UserError

MAX_INFERRED_CLASSES = 20


@dataclass(frozen=True)
class Target:
    y: np.ndarray  # class indices (int64) or float64 values
    task: str
    class_names: tuple[str, ...] = ()


def check_task(task: str | None, name: str) -> str | None:
    """`dataset.task`: null (inferred) or one of TASKS."""
    if task is not None and task not in TASKS:
        raise UserError(f"dataset.task = {task!r}: expected null (inferred from the labels) or one of {', '.join(TASKS)}",
                        f"e.g. dlrun dataset={name} dataset.task=regression")
    return task


def encode_target(values: np.ndarray | pd.api.extensions.ExtensionArray, task: str | None, where: str,
                  classes: tuple[str, ...] | None = None) -> Target:
    """Encode 1-D labels without missing values (a NumPy array, or a pandas array such as a CSV's Arrow
    strings). `where` names them in messages (a column, a file);
    `classes`, a run's saved class names, fixes the numbering instead of the sorted values."""
    kind = values.dtype.kind
    numeric = kind in "fiub"
    if task is None:
        if kind == "f" or (kind in "iu" and len(pd.unique(values)) > MAX_INFERRED_CLASSES):
            task = "regression"
        else:
            task = "binary" if len(pd.unique(values)) == 2 else "multiclass"
    if task == "regression":
        if not numeric:
            raise DataError(f"{where} holds text ({values[:3].tolist()}, ...), which cannot be a regression target.",
                            "Leave dataset.task unset (classes are inferred) or set dataset.task=multiclass.")
        y = values.astype(np.float64)
        if len(y) and np.all(y == y[0]):
            raise DataError(f"{where} has one value only ({y[0]:g}): there is nothing to learn.",
                            "Point dataset.target (or the labels) at a column that varies.")
        return Target(y, task)
    codes, levels = _classes(values)
    names = tuple(str(v) for v in levels)
    if classes is not None:  # a trained run's numbering; a label it never saw cannot be scored
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise DataError(f"{where} holds labels the run was not trained on: {', '.join(unknown[:10])}.",
                            "Evaluate on the data the run was trained on.")
        codes = np.array([index[n] for n in names], dtype=np.int64)[codes]
        names = tuple(classes)
    if len(names) < 2:
        raise DataError(f"{where} has one class only ({names[0] if names else 'none'}): a classifier needs two or more.",
                        "Point dataset.target (or the labels) at another column, or add samples of other classes.")
    if task == "binary" and len(names) != 2:
        raise DataError(f"dataset.task = binary, but {where} has {len(names)} classes ({', '.join(names[:10])}).",
                        "Use dataset.task=multiclass, or leave dataset.task unset.")
    return Target(codes.astype(np.int64), task, names)


def _classes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of each value's class, sorted distinct values); values of mixed types are compared as text."""
    try:
        return pd.factorize(values, sort=True)
    except TypeError:  # e.g. 3 and "3" in one object column
        return pd.factorize(values.astype(str), sort=True)
