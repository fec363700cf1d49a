"""Validation of a composed config, before torch is imported.

The YAML files under `conf/` are the defaults; this module is the schema: one table of rules, each
naming a key pattern (fnmatch over the dotted key, e.g. ``model.width`` or ``regularizer.*.alpha``),
the type it must have and its allowed range or choices. A table rather than one dataclass per
component keeps component configs open: a user who points ``_target_`` at their own class may add
knobs of their own, and the rules still check every knob whose name the table knows. Hydra already
refuses unknown keys and unknown group options; this adds types and ranges, and names the key and
the allowed values in every message.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from dlrun.errors import UserError

ACTIVATIONS = ("relu", "leaky_relu", "prelu", "elu", "sigmoid", "tanh", "identity", "gelu")
INIT_SCHEMES = ("default", "zeros", "normal", "xavier", "he", "lecun")
TASKS = ("multiclass", "binary", "regression")


@dataclass(frozen=True)
class Rule:
    """What one key accepts. `kind` is int, float, bool, str, or ints/floats (a scalar or a list of them)."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the bound itself is excluded
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    length: int | None = None  # for lists: exact number of elements

    def describe(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(self.choices)
        else:
            noun = {
                "int": "an integer",
                "float": "a number",
                "bool": "true or false",
                "str": "a string",
                "ints": "an integer or a list of integers",
                "floats": "a number or a list of numbers",
            }[self.kind]
            if self.length is not None:
                noun = f"a list of {self.length} numbers"
            text = noun + self._range_text()
        return text + (" (or null)" if self.nullable else "")

    def _range_text(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            return f" in {left}{_fmt(lo)}, {_fmt(hi)}{right}"
        if lo is not None:
            return f" {'>' if self.low_open else '>='} {_fmt(lo)}"
        if hi is not None:
            return f" {'<' if self.high_open else '<='} {_fmt(hi)}"
        return ""

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.choices is not None:
            return isinstance(value, str) and value in self.choices
        if self.kind in ("ints", "floats"):
            scalar = "int" if self.kind == "ints" else "float"
            if isinstance(value, (list, tuple, ListConfig)):
                if self.length is not None and len(value) != self.length:
                    return False
                return len(value) > 0 and all(self._scalar_ok(scalar, v) for v in value)
            return self.length is None and self._scalar_ok(scalar, value)
        return self._scalar_ok(self.kind, value)

    def _scalar_ok(self, kind: str, value: Any) -> bool:
        if kind == "bool":
            return isinstance(value, bool)
        if kind == "str":
            return isinstance(value, str)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if kind == "int" and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e6 else f"{x:g}"


def positive_int(nullable: bool = False) -> Rule:
    return Rule("int", low=1, nullable=nullable)


def probability(open_high: bool = True) -> Rule:
    return Rule("float", low=0, high=1, high_open=open_high)


def positive(nullable: bool = False) -> Rule:
    return Rule("float", low=0, low_open=True, nullable=nullable)


def non_negative() -> Rule:
    return Rule("float", low=0)


# Key pattern -> rule. Patterns are matched against the full dotted key; the first match wins.
RULES: dict[str, Rule] = {
    # --- top level -------------------------------------------------------------------------
    "seed": Rule("int", low=0),
    "print_config": Rule("bool"),
    # --- dataset (shared keys, then per-data-set knobs) ------------------------------------
    "dataset.batch_size": positive_int(),
    "dataset.n_train": positive_int(nullable=True),
    "dataset.val_fraction": Rule("float", low=0, high=1, low_open=True, high_open=True),
    "dataset.test_fraction": Rule("float", low=0, high=1, low_open=True, high_open=True),
    "dataset.normalize": Rule("bool"),
    "dataset.length": positive_int(),
    "dataset.n_samples": positive_int(),
    "dataset.noise": non_negative(),
    "dataset.download": Rule("bool"),
    "dataset.root": Rule("str"),
    "dataset.path": Rule("str"),
    "dataset.window": positive_int(),
    # --- model ------------------------------------------------------------------------------
    "model.width": Rule("ints", low=1),
    "model.depth": Rule("int", low=0),
    "model.hidden": Rule("int", low=0),
    "model.layers": positive_int(),
    "model.channels": Rule("ints", low=1),
    "model.kernel": positive_int(),
    "model.stride": positive_int(),
    "model.padding": Rule("str", choices=("same", "valid")),
    "model.pool": Rule("str", choices=("max", "avg", "none")),
    "model.activation": Rule("str", choices=ACTIVATIONS),
    "model.nonlinearity": Rule("str", choices=("tanh", "relu")),
    "model.batch_norm": Rule("bool"),
    "model.bidirectional": Rule("bool"),
    "model.residual": Rule("bool"),
    "model.dropout": probability(),
    "model.input_dropout": probability(),
    "model.d_model": positive_int(),
    "model.heads": positive_int(),
    "model.ffn": positive_int(),
    "model.blocks": positive_int(),
    "model.dilations": Rule("ints", low=1),
    "model.init": Rule("str", choices=INIT_SCHEMES),
    "model.init_std": positive(),
    "model.init_bias": Rule("float"),
    # --- optimizer ---------------------------------------------------------------------------
    "optim.lr": positive(),
    "optim.momentum": probability(),
    "optim.dampening": probability(),
    "optim.nesterov": Rule("bool"),
    "optim.weight_decay": non_negative(),
    "optim.betas": Rule("floats", low=0, high=1, high_open=True, length=2),
    "optim.eps": positive(),
    "optim.alpha": probability(),
    "optim.lr_decay": non_negative(),
    "optim.initial_accumulator_value": non_negative(),
    "optim.centered": Rule("bool"),
    "optim.amsgrad": Rule("bool"),
    # --- scheduler ---------------------------------------------------------------------------
    "scheduler.step_size": positive_int(),
    "scheduler.gamma": Rule("float", low=0, high=1, low_open=True),
    "scheduler.decay": non_negative(),
    "scheduler.patience": Rule("int", low=0),
    "scheduler.factor": Rule("float", low=0, high=1, low_open=True, high_open=True),
    "scheduler.warmup_epochs": Rule("int", low=0),
    "scheduler.min_lr": non_negative(),
    "scheduler.end_factor": Rule("float", low=0, high=1),
    "scheduler.total_epochs": positive_int(nullable=True),
    # --- regularizers (each sits under its own name: regularizer.l2.alpha) -------------------
    "regularizer.*.alpha": non_negative(),
    "regularizer.*.l1": non_negative(),
    "regularizer.*.l2": non_negative(),
    "regularizer.*.p": probability(),
    "regularizer.*.p_input": probability(),
    "regularizer.*.max_norm": positive(),
    "regularizer.*.sigma": non_negative(),
    "regularizer.*.epsilon": probability(),
    "regularizer.*.threshold": positive(),
    # --- hardware ----------------------------------------------------------------------------
    "hardware.num_nodes": positive_int(),
    "hardware.sync_batchnorm": Rule("bool"),
    "hardware.precision": Rule(
        "str", choices=("32-true", "32", "16-mixed", "bf16-mixed", "64-true", "bf16-true", "16-true")
    ),
    # --- callbacks ---------------------------------------------------------------------------
    "callbacks.monitor": Rule("str"),
    "callbacks.mode": Rule("str", choices=("min", "max")),
    "callbacks.early_stopping.enabled": Rule("bool"),
    "callbacks.early_stopping.patience": Rule("int", low=0),
    "callbacks.early_stopping.min_delta": non_negative(),
    "callbacks.early_stopping.stopping_threshold": Rule("float", nullable=True),
    "callbacks.checkpoint.save_last": Rule("bool"),
    "callbacks.model_summary": Rule("bool"),
    # --- trainer -----------------------------------------------------------------------------
    "trainer.max_epochs": positive_int(),
    "trainer.min_epochs": Rule("int", low=0),
    "trainer.deterministic": Rule("bool"),
    "trainer.log_every_n_steps": positive_int(),
    "trainer.num_sanity_val_steps": Rule("int", low=-1),
}

# Keys whose value may be an int (a number of batches) or a float (a fraction of the batches).
_LIMIT_KEYS = ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches")


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (dotted key, value) for every leaf; lists of scalars count as one leaf."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            if str(key).startswith("_") and str(key).endswith("_"):
                continue  # _target_, _partial_: Hydra's, not a knob
            yield from _leaves(node[key], f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def find_problems(cfg: DictConfig) -> list[str]:
    """Every violated rule of `cfg`, as one line each: the key, the value given, what is allowed."""
    problems: list[str] = []
    for key, raw in _leaves(cfg):
        value = _plain(raw)
        if key in _LIMIT_KEYS:
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
                isinstance(value, float) and 0.0 <= value <= 1.0
            )
            if not ok:
                problems.append(f"{key} = {value!r}: expected a fraction in [0, 1] or a number of batches >= 0")
            continue
        rule = next((r for pattern, r in RULES.items() if fnmatchcase(key, pattern)), None)
        if rule is not None and not rule.accepts(value):
            problems.append(f"{key} = {value!r}: expected {rule.describe()}")
    problems += _cross_checks(cfg)
    return problems


def _cross_checks(cfg: DictConfig) -> list[str]:
    problems = []
    ds = cfg.get("dataset", {})
    val, test = ds.get("val_fraction"), ds.get("test_fraction")
    if isinstance(val, (int, float)) and isinstance(test, (int, float)) and val + test >= 1:
        problems.append(
            f"dataset.val_fraction + dataset.test_fraction = {val + test:g}: must be < 1 to leave training data"
        )
    tr = cfg.get("trainer", {})
    lo, hi = tr.get("min_epochs"), tr.get("max_epochs")
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        problems.append(f"trainer.min_epochs = {lo} exceeds trainer.max_epochs = {hi}")
    return problems


def validate(cfg: DictConfig) -> None:
    """Raise one UserError listing every problem in `cfg`; return quietly when there is none."""
    try:
        problems = find_problems(cfg)
    except Exception as err:  # an interpolation that cannot resolve, a missing mandatory value
        raise UserError(f"The config cannot be resolved: {err}", "Check the keys named above.") from err
    if problems:
        raise UserError(
            "\n".join(problems),
            "Fix the value(s) on the command line, e.g. optim.lr=0.01; `dlrun --cfg job` shows every key.",
        )
