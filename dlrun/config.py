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
        if self.choices is not None:  # an int is read as its text: hardware.precision=32
            return isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) in self.choices
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
    "resume": Rule("str", nullable=True),  # a run directory; the CLI checks it and re-uses its config
    # --- dataset (shared keys, then per-data-set knobs) ------------------------------------
    "dataset.batch_size": positive_int(),
    "dataset.n_train": positive_int(nullable=True),
    "dataset.val_fraction": Rule("float", low=0, high=1, low_open=True, high_open=True),
    "dataset.test_fraction": Rule("float", low=0, high=1, low_open=True, high_open=True),
    "dataset.normalize": Rule("bool"),
    "dataset.split_seed": Rule("int", low=0, nullable=True),
    "dataset.length": positive_int(),
    "dataset.n_samples": Rule("int", low=10),  # enough for three non-empty splits
    "dataset.noise": non_negative(),
    "dataset.repeat": positive_int(),
    "dataset.scale": Rule("float", low=0, high=1, low_open=True),
    "dataset.optimum": Rule("floats", length=2),
    "dataset.factor": Rule("float", low=0, high=1, low_open=True, high_open=True),
    "dataset.arms": Rule("int", low=2),
    "dataset.turns": positive(),
    "dataset.centers": Rule("int", low=2),
    "dataset.n_features": positive_int(),
    "dataset.degree": positive_int(),
    "dataset.symbols": Rule("int", low=2),
    "dataset.period": Rule("float", low=2),  # steps per cycle; fewer than 2 aliases
    "dataset.download": Rule("bool"),
    "dataset.root": Rule("str"),
    "dataset.path": Rule("str", nullable=True),  # null: the text data set says what to set
    "dataset.window": positive_int(),
    "dataset.stride": positive_int(nullable=True),
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
    "model.init_bias": Rule("float", nullable=True),
    "model.convs": positive_int(),
    "model.pooling": Rule("str", choices=("mean", "last", "cls")),
    "model.positional": Rule("str", choices=("sinusoidal", "learned", "none")),
    # --- optimizer ---------------------------------------------------------------------------
    "optim.lr": positive(),
    "optim.momentum": probability(),
    "optim.dampening": probability(),
    "optim.nesterov": Rule("bool"),
    "optim.weight_decay": non_negative(),
    "optim.betas": Rule("floats", low=0, high=1, high_open=True, length=2),
    "optim.eps": non_negative(),  # 0 only with adagrad's initial_accumulator_value > 0 (cross-checked)
    "optim.alpha": probability(),
    "optim.lr_decay": non_negative(),
    "optim.initial_accumulator_value": non_negative(),
    "optim.centered": Rule("bool"),
    "optim.amsgrad": Rule("bool"),
    # --- scheduler ---------------------------------------------------------------------------
    "scheduler.interval": Rule("str", choices=("epoch", "step")),
    "scheduler.step_size": positive_int(),
    "scheduler.gamma": Rule("float", low=0, high=1, low_open=True),
    "scheduler.decay": non_negative(),
    "scheduler.start_factor": Rule("float", low=0, high=1, low_open=True),
    "scheduler.end_factor": Rule("float", low=0, high=1),
    "scheduler.total_iters": positive_int(),
    "scheduler.warmup_iters": Rule("int", low=0),
    "scheduler.T_max": positive_int(),
    "scheduler.eta_min": non_negative(),
    "scheduler.mode": Rule("str", choices=("min", "max")),
    "scheduler.factor": Rule("float", low=0, high=1, low_open=True, high_open=True),
    "scheduler.patience": Rule("int", low=0),
    "scheduler.threshold": non_negative(),
    "scheduler.cooldown": Rule("int", low=0),
    "scheduler.min_lr": non_negative(),
    # --- regularizers (each sits under its own name: regularizer.l2.alpha) -------------------
    "regularizer.*.alpha": non_negative(),
    "regularizer.*.l1": non_negative(),
    "regularizer.*.l2": non_negative(),
    "regularizer.*.p": probability(),
    "regularizer.*.p_input": probability(),
    "regularizer.*.c": positive(),
    "regularizer.*.sigma": non_negative(),
    "regularizer.*.epsilon": probability(),
    "regularizer.*.threshold": positive(),
    "regularizer.*.algorithm": Rule("str", choices=("norm", "value")),
    "regularizer.*.crop_padding": Rule("int", low=0),
    "regularizer.*.flip": Rule("bool"),
    "regularizer.*.degrees": Rule("float", low=0, high=180),
    "regularizer.*.scale": Rule("float", low=0, high=1, high_open=True),
    "regularizer.*.brightness": Rule("float", low=0, high=1),
    "regularizer.*.contrast": Rule("float", low=0, high=1),
    "regularizer.*.cutout": Rule("int", low=0),
    # --- hardware ----------------------------------------------------------------------------
    "hardware.accelerator": Rule("str", choices=("auto", "cpu", "gpu", "cuda", "mps")),
    # hardware.devices (a count, -1, "auto" or a list of ids) is checked in _hardware_checks
    "hardware.num_nodes": positive_int(),
    # ddp_spawn is left out on purpose: its ranks run in spawned children, out of the summary's reach
    "hardware.strategy": Rule("str", choices=("auto", "ddp", "ddp_find_unused_parameters_true")),
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
    "callbacks.divergence.enabled": Rule("bool"),
    "callbacks.divergence.factor": Rule("float", low=1, low_open=True, nullable=True),
    # --- logger (each sits under its own name: logger.wandb.mode; tags are checked by the logger) --
    "logger.wandb.mode": Rule("str", choices=("online", "offline", "disabled"), nullable=True),
    "logger.wandb.project": Rule("str"),
    "logger.wandb.entity": Rule("str", nullable=True),
    "logger.wandb.group": Rule("str", nullable=True),
    "logger.wandb.name": Rule("str", nullable=True),
    "logger.wandb.job_type": Rule("str", nullable=True),
    "logger.wandb.log_model": Rule("bool"),
    "logger.tensorboard.name": Rule("str"),
    "logger.tensorboard.version": Rule("str"),
    "logger.tensorboard.default_hp_metric": Rule("bool"),
    # --- trainer -----------------------------------------------------------------------------
    "trainer.max_epochs": positive_int(),
    "trainer.min_epochs": Rule("int", low=0),
    "trainer.deterministic": Rule("bool"),
    # trainer.steps_per_execution (auto or a count >= 1) is checked in _cross_checks
    "trainer.accumulate_grad_batches": positive_int(),
    "trainer.log_every_n_steps": positive_int(),
    "trainer.num_sanity_val_steps": Rule("int", low=-1),
    # --- sweep (dlrun -m; the launcher checks its own hydra.launcher.* knobs) -----------------
    "sweep.n_trials": positive_int(),
    "sweep.n_startup_trials": Rule("int", low=0),
    "sweep.seed": Rule("int", low=0, nullable=True),
    "sweep.resume": Rule("str", nullable=True),
}

# Keys whose value may be an int (a number of batches) or a float (a fraction of the batches).
_LIMIT_KEYS = ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches")


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (dotted key, value) for every leaf; lists of scalars count as one leaf."""
    if isinstance(node, DictConfig):
        for key in node:
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
    steps = tr.get("steps_per_execution", "auto")
    if steps != "auto" and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        problems.append(f"trainer.steps_per_execution = {steps!r}: expected auto or an integer >= 1")
    opt = cfg.get("optim", {})
    if opt.get("eps") == 0 and not opt.get("initial_accumulator_value"):  # adagrad's delta may replace eps
        problems.append("optim.eps = 0: divides by zero wherever a gradient is 0; use optim.eps > 0")
    return problems + _hardware_checks(cfg.get("hardware", {}))


def _hardware_checks(hw: Any) -> list[str]:
    problems = []
    devices = _plain(hw.get("devices", 1))
    if not (
        devices == "auto"
        or (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1))
        or (isinstance(devices, list) and devices and all(isinstance(d, int) and d >= 0 for d in devices))
    ):
        problems.append(
            f"hardware.devices = {devices!r}: expected a count >= 1, -1 (every visible device), auto,"
            " or a list of device ids"
        )
    if hw.get("sync_batchnorm") is True and hw.get("accelerator") == "cpu":
        problems.append("hardware.sync_batchnorm = true: torch's SyncBatchNorm runs on GPUs only; set it to false")
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
