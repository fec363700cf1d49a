"""Validation of a composed config, before torch is imported.

Each option declares its knobs where it lives: in its YAML file under `conf/<group>/<option>.yaml`,
one knob a line, with its rule in brackets at the start of the knob's comment:

    hidden: 64            # [int >= 1] state size
    dropout: 0.0          # [float in [0, 1)] between stacked layers
    padding: same         # [same | valid]
    stride: null          # [int >= 1 | null] characters between window starts
    width: 128            # [int >= 1 | list of int >= 1] one width per hidden layer
    betas: [0.9, 0.999]   # [list of 2 float in [0, 1)]

A rule is alternatives separated by `|`: `int`, `float`, `bool`, `str` or `any`, each optionally
`list of [N]` (a non-empty list, of exactly N elements when given) and followed by a range (`>= 1`,
`> 0`, `<= 180`, `in [0, 1)`); `null`; or a literal value (`auto`, `-1`, `32-true`), compared as text.
The keys shared by every data set and the top-level keys (`seed`, ...) are declared the same way in
`conf/config.yaml`; an option that repeats a shared key (`batch_size: 32`) keeps its rule.

The options' own knobs are the only ones their component takes: a key that its option does not
declare (`+model.my_knob=1`) is refused, naming the option and listing its knobs, unless the
config points `_target_` at another class (that class's knobs are its own business). A user's option
from `hydra.searchpath` is read the same way; without annotations its keys are still its knobs.
Hydra's choices (which option of each group was picked) say which file declares a group's knobs;
without them (a run directory's saved config, tests) the option is recognized by its `_target_` and
keys. List groups (`regularizer`, `logger`) keep each option under its own name, which is the option.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from dlrun import CONF_DIR
from dlrun.errors import UserError

#: groups with one option each, whose knobs sit directly under the group's key
SINGLE_GROUPS = ("dataset", "model", "optim", "scheduler", "hardware", "callbacks", "trainer", "sweep", "paths")
#: groups that take a list of options, each under its own name: regularizer.l2.alpha
LIST_GROUPS = ("regularizer", "logger")

_INT64 = 2**63  # numpy's and torch's integers: larger counts overflow inside the libraries


@dataclass(frozen=True)
class Kind:
    """One typed alternative of a rule: a number, a flag, a string, or a list of them, with a range."""

    name: str  # int | float | bool | str | any
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the bound itself is excluded
    high_open: bool = False
    is_list: bool = False
    length: int | None = None  # for lists: exact number of elements

    def describe(self) -> str:
        if self.is_list:
            plural = {"int": "integers", "float": "numbers", "bool": "flags", "str": "strings", "any": "values"}
            count = f"{self.length} " if self.length is not None else ""
            return f"a list of {count}{plural[self.name]}{self._range_text()}"
        noun = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "any": "anything"}
        return noun[self.name] + self._range_text()

    def _range_text(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f" in {'(' if self.low_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if self.high_open else ']'}"
        if lo is not None:
            return f" {'>' if self.low_open else '>='} {_fmt(lo)}"
        if hi is not None:
            return f" {'<' if self.high_open else '<='} {_fmt(hi)}"
        return ""

    def accepts(self, value: Any) -> bool:
        if not self.is_list:
            return self._scalar_ok(value)
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        if self.length is not None and len(value) != self.length:
            return False
        return len(value) > 0 and all(self._scalar_ok(v) for v in value)

    def _scalar_ok(self, value: Any) -> bool:
        if self.name == "any":
            return True
        if self.name == "bool":
            return isinstance(value, bool)
        if self.name == "str":
            return isinstance(value, str)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.name == "int" and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


@dataclass(frozen=True)
class Rule:
    """What one knob accepts: any of `kinds`, any of `literals` (compared as text), or null if `nullable`."""

    kinds: tuple[Kind, ...] = ()
    literals: tuple[str, ...] = ()
    nullable: bool = False

    def describe(self) -> str:
        if not self.kinds:
            text = "one of " + ", ".join(self.literals)
        else:
            text = " or ".join([", ".join(self.literals)] * bool(self.literals) + [k.describe() for k in self.kinds])
        return text + (" (or null)" if self.nullable else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        # an int is read as its text: hardware.precision=32, hardware.devices=-1
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) in self.literals:
            return True
        return any(kind.accepts(value) for kind in self.kinds)


_TYPED = re.compile(r"^(?P<list>list of (?:(?P<length>\d+) )?)?(?P<name>int|float|bool|str|any)\b\s*(?P<range>.*)$")
_BOUND = re.compile(r"^(?P<op>>=|>|<=|<)\s*(?P<x>\S+)$")
_INTERVAL = re.compile(r"^in\s*(?P<left>[\[(])\s*(?P<lo>[^,\s]+)\s*,\s*(?P<hi>[^\])\s]+)\s*(?P<right>[\])])$")


def parse_rule(text: str) -> Rule:
    """A rule from its written form, e.g. `int >= 1 | null` or `float in [0, 1)`; ValueError if unreadable."""
    kinds: list[Kind] = []
    literals: list[str] = []
    nullable = False
    for alternative in (a.strip() for a in text.split("|")):
        typed = _TYPED.match(alternative)
        if alternative == "null":
            nullable = True
        elif typed:
            length = typed["length"]
            kinds.append(Kind(typed["name"], is_list=bool(typed["list"]), length=int(length) if length else None,
                              **_parse_range(typed["range"].strip(), typed["name"])))
        elif alternative and " " not in alternative:
            literals.append(alternative)
        else:
            raise ValueError(f"cannot read the rule alternative {alternative!r} in [{text}]")
    return Rule(tuple(kinds), tuple(literals), nullable)


def _parse_range(text: str, name: str) -> dict[str, Any]:
    if not text:
        return {}
    if name not in ("int", "float"):
        raise ValueError(f"a range ({text!r}) needs int or float, not {name}")
    bound, interval = _BOUND.match(text), _INTERVAL.match(text)
    if bound:
        op, x = bound["op"], _number(bound["x"])
        return {"low": x, "low_open": op == ">"} if op.startswith(">") else {"high": x, "high_open": op == "<"}
    if interval:
        return {"low": _number(interval["lo"]), "high": _number(interval["hi"]),
                "low_open": interval["left"] == "(", "high_open": interval["right"] == ")"}
    raise ValueError(f"cannot read the range {text!r}: write >= 1, > 0, <= 180 or in [0, 1)")


def _number(text: str) -> float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


# --- reading the rules out of the option files ---------------------------------------------------------
@dataclass
class Option:
    """One option file: its class, its knobs (dotted keys) with their rules (None: not annotated)."""

    name: str  # as the user selects it: model=lstm
    target: Any = None
    knobs: dict[str, Rule | None] = field(default_factory=dict)


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where installed: 10x faster
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")


def read_option(path: Path, name: str, under: str | None = None) -> tuple[Option, list[str]]:
    """The option in `path` (for list groups, the part `under` its own name) and the same-group options
    its `defaults` list extends (callbacks=no_early_stopping extends default)."""
    text = path.read_text()
    try:
        data = yaml.load(text, Loader=_YAML_LOADER) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}", "Fix the file.", title="Unreadable config file") from err
    rules = _annotations(text, path)
    if under is not None:
        data = data.get(under) if isinstance(data, dict) else None
        rules = {k[len(under) + 1:]: r for k, r in rules.items() if k.startswith(under + ".")}
    data = data if isinstance(data, dict) else {}
    parents = [d for d in data.get("defaults", []) or [] if isinstance(d, str) and d != "_self_"]
    knobs = {key: rules.get(key) for key in _knob_keys(data)}
    return Option(name, data.get("_target_"), knobs), parents


def _knob_keys(data: Mapping, prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        if key == "defaults" or (str(key).startswith("_") and str(key).endswith("_")):
            continue
        if isinstance(value, dict) and value:
            yield from _knob_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _annotations(text: str, path: Path) -> dict[str, Rule]:
    """{dotted key: rule} for every `key: value  # [rule] ...` line; nesting is read from the indentation."""
    rules: dict[str, Rule] = {}
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        match = _KEY_LINE.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        comment = _comment(match["rest"])
        if comment.startswith("["):
            try:
                rules[".".join(k for _, k in stack)] = parse_rule(_bracketed(comment))
            except ValueError as err:
                raise UserError(f"{path}:{number}: {err}", "Rules look like [int >= 1], [float in [0, 1)], "
                                "[relu | tanh] or [str | null] (see dlrun/config.py).", title="Unreadable rule") from err
    return rules


def _comment(rest: str) -> str:
    """The text after the `#` that starts a YAML comment (outside quotes, after a space), or ''."""
    quote = None
    for i, char in enumerate(rest):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[i + 1:].strip()
    return ""


def _bracketed(comment: str) -> str:
    """`[float in [0, 1)] drop probability` -> `float in [0, 1)`: brackets and parentheses nest."""
    depth = 0
    for i, char in enumerate(comment):
        depth += (char in "[(") - (char in "])")
        if depth == 0:
            return comment[1:i]
    raise ValueError(f"the rule in {comment!r} is not closed with ]")


class Catalog:
    """The options of every group, read (once each) from the config directories in search order."""

    def __init__(self, conf_dirs: Sequence[Path]):
        self.conf_dirs = list(conf_dirs)
        self._options: dict[tuple[str, str], Option | None] = {}
        top, _ = read_option(CONF_DIR / "config.yaml", "config")
        self.top = {k: r for k, r in top.knobs.items() if "." not in k}
        self.shared = {k.split(".", 1)[1]: r for k, r in top.knobs.items() if "." in k}  # dataset.batch_size, ...

    def option(self, group: str, name: str) -> Option | None:
        """The option with its parents' knobs (and, for data sets, the shared keys); None if no file has it."""
        if (group, name) not in self._options:
            self._options[group, name] = None  # a defaults cycle ends here
            self._options[group, name] = self._read(group, name)
        return self._options[group, name]

    def _read(self, group: str, name: str) -> Option | None:
        path = next((d / group / f"{name}.yaml" for d in self.conf_dirs if (d / group / f"{name}.yaml").is_file()), None)
        if path is None:
            return None
        own, parents = read_option(path, name, under=name if group in LIST_GROUPS else None)
        knobs: dict[str, Rule | None] = dict(self.shared) if group == "dataset" else {}
        for parent in (self.option(group, p) for p in parents):
            knobs.update(parent.knobs if parent else {})
        for key, rule in own.knobs.items():  # a repeated key without a rule keeps the inherited one
            knobs[key] = rule if rule is not None or key not in knobs else knobs[key]
        return Option(name, own.target, knobs)

    def names(self, group: str) -> list[str]:
        return sorted({p.stem for d in self.conf_dirs for p in (d / group).glob("*.yaml")})

    def recognize(self, group: str, node: DictConfig) -> Option | None:
        """Without Hydra's choices: the option with the node's `_target_` whose knobs the node has, the
        most specific first (optim=momentum over optim=sgd when momentum is set)."""
        keys = {key for key, _ in _leaves(node)}
        target = node.get("_target_")
        fitting = [o for o in map(lambda n: self.option(group, n), self.names(group))
                   if o is not None and o.target == target and set(o.knobs) <= keys]
        return max(fitting, key=lambda o: len(o.knobs), default=None)


# --- checking a composed config ------------------------------------------------------------------------
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


def _check(key: str, raw: Any, rule: Rule | None, option: str = "") -> str | None:
    """The problem with one knob's value, naming the option whose rule it breaks (model=lstm), if any."""
    value = _plain(raw)
    if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
        return f"{key} = {value!r}: too large for the 64-bit integers numpy and torch count with"
    if rule is not None and not rule.accepts(value):
        return f"{key} = {value!r}: expected {rule.describe()}" + (f" ({option})" if option else "")
    return None


_ABSENT = object()


def _component_problems(group: str, prefix: str, node: DictConfig, option: Option) -> list[str]:
    """`node` (at `prefix`, e.g. regularizer.l2) against its option: rules, and no knob the option lacks."""
    problems = []
    own_class = node.get("_target_") == option.target  # another class: its extra knobs are its own
    for key, raw in _leaves(node):
        if key in option.knobs:
            problem = _check(f"{prefix}.{key}", raw, option.knobs[key], f"{group}={option.name}")
        elif any(key.startswith(f"{knob}.") for knob in option.knobs):
            continue  # inside a knob that holds an object of its own (trainer.profiler: a _target_ entry)
        elif own_class:
            close = difflib.get_close_matches(key, list(option.knobs), n=1)
            problem = (f"{prefix}.{key}: {group}={option.name} has no knob '{key}'"
                       + (f" (did you mean '{close[0]}'?)" if close else "")
                       + (f"; its knobs: {', '.join(option.knobs)}" if option.knobs else "; it has no knobs"))
        else:
            problem = _check(f"{prefix}.{key}", raw, None)
        if problem:
            problems.append(problem)
    if own_class:  # removed with ~key: the class (or dlrun) would fail on it later, with a traceback
        problems += [f"{prefix}.{knob}: {group}={option.name} needs this knob; it was removed (~{prefix}.{knob})"
                     for knob in option.knobs if OmegaConf.select(node, knob, default=_ABSENT) is _ABSENT]
    return problems


def find_problems(cfg: DictConfig, hydra: Any = None) -> list[str]:
    """Every problem of `cfg`, one line each: the key, the value given, what is allowed.

    `hydra` is Hydra's own config node (HydraConfig.get(), or a sweep config's `hydra`): its runtime
    choices name each group's option, its config sources are where the option files are.
    """
    choices, conf_dirs = _hydra_context(hydra)
    catalog = Catalog(conf_dirs)
    problems: list[str] = []
    for key in cfg:
        node = cfg[key]
        if key in SINGLE_GROUPS and isinstance(node, DictConfig):
            option = catalog.option(key, choices[key]) if choices.get(key) else catalog.recognize(key, node)
            if option is not None:
                problems += _component_problems(key, key, node, option)
            else:  # a user's option this process cannot find: the shared keys' rules still hold
                shared = catalog.shared if key == "dataset" else {}
                problems += [p for k, v in _leaves(node) if (p := _check(f"{key}.{k}", v, shared.get(k)))]
        elif key in LIST_GROUPS and isinstance(node, DictConfig):
            for name in node:
                option = catalog.option(key, str(name))
                if option is not None and isinstance(node[name], DictConfig):
                    problems += _component_problems(key, f"{key}.{name}", node[name], option)
        elif key != "hydra":
            problems += [p for k, v in _leaves(node, f"{key}.") if (p := _check(k, v, catalog.top.get(k)))]
    problems += [f"{key}: a top-level key of every config; it was removed (~{key})" for key in catalog.top
                 if key not in cfg]
    return problems + _cross_checks(cfg)


def _hydra_context(hydra: Any) -> tuple[dict[str, Any], list[Path]]:
    """(group -> chosen option, config directories in search order) from Hydra's config node."""
    runtime = hydra.get("runtime") if hydra is not None else None
    if runtime is None:
        return {}, [CONF_DIR]
    choices = {str(k): v for k, v in (runtime.get("choices") or {}).items() if isinstance(v, str)}
    dirs = [Path(s.path) for s in runtime.get("config_sources") or [] if s.schema == "file" and s.path]
    return choices, dirs or [CONF_DIR]


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
    opt = cfg.get("optim", {})
    if opt.get("eps") == 0 and not opt.get("initial_accumulator_value"):  # adagrad's delta may replace eps
        problems.append("optim.eps = 0: divides by zero wherever a gradient is 0; use optim.eps > 0")
    return problems + _hardware_checks(cfg.get("hardware", {}))


def _hardware_checks(hw: Any) -> list[str]:
    problems = []
    if hw.get("sync_batchnorm") is True and hw.get("accelerator") == "cpu":
        problems.append("hardware.sync_batchnorm = true: torch's SyncBatchNorm runs on GPUs only; set it to false")
    return problems


def validate(cfg: DictConfig, hydra: Any = None) -> None:
    """Raise one UserError listing every problem in `cfg`; return quietly when there is none."""
    try:
        problems = find_problems(cfg, hydra)
    except UserError:
        raise
    except Exception as err:  # an interpolation that cannot resolve, a missing mandatory value
        raise UserError(f"The config cannot be resolved: {err}", "Check the keys named above.") from err
    if problems:
        raise UserError(
            "\n".join(problems),
            "Fix the value(s) on the command line, e.g. optim.lr=0.01; `dlrun --cfg job` shows every key. "
            "A knob of your own belongs in an option file of your own (README: Your own configs).",
        )
