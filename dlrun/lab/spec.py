"""A lab's YAML file (conf/lab/<name>.yaml), read and checked: the claim, its source, the sweep of each
size, the verdict rule and the figure. Imports no torch.

    claim: A linear model cannot fit XOR; one hidden layer can.   # one sentence
    source: "000 §3.2 (the XOR problem)"                          # where the notes make the claim
    factor: model                       # the key the claim is about ...
    levels: [logreg, mlp]               # ... and its values, as written on a command line
    fixed: [dataset=xor]                # settings every job shares, at every size
    sizes:
      quick: {seeds: [0, 1, 2], fixed: [trainer.max_epochs=100], takes: "40 s"}
      full: {seeds: [0, 1, 2, 3, 4], fixed: [trainer.max_epochs=400], takes: "2 min"}
    verdict:                            # every check must hold (dlrun/lab/verdict.py)
      - {level: logreg, quantity: test/acc, is: "<=", than: 0.75}
      - {level: mlp, quantity: test/acc, is: ">=", than: 1.0}
    measure: test/acc                   # the quantity drawn by level (default: the first check's)
    curves: val/acc                     # the metrics.csv column drawn against the epoch (default val/loss)

A size may also set its own `levels`. Every quantity is checked here, when the file is read, so that a
mistyped rule fails before any training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dlrun import CONF_DIR
from dlrun.errors import UserError
from dlrun.lab.verdict import Check, parse_check, parse_quantity

LAB_DIR = CONF_DIR / "lab"
SIZES = ("quick", "full")
_KEYS = {"claim", "source", "factor", "levels", "fixed", "sizes", "verdict", "measure", "curves", "log_scale"}
_SIZE_KEYS = {"seeds", "fixed", "levels", "takes"}


@dataclass(frozen=True)
class Size:
    """The sweep of one size: the factor's levels, the seeds, the fixed settings, and how long it takes here."""

    levels: tuple[str, ...]
    seeds: tuple[int, ...]
    fixed: tuple[str, ...]
    takes: str


@dataclass(frozen=True)
class Lab:
    name: str
    claim: str
    source: str
    factor: str
    sizes: dict[str, Size]
    checks: tuple[Check, ...]
    measure: str
    curves: str
    log_scale: bool  # draw the curves and the measure on a log axis (losses spanning decades)
    path: Path

    def quantities(self) -> list[str]:
        """The measured quantity, then every quantity the verdict reads (the report's columns)."""
        return list(dict.fromkeys([self.measure, *(c.quantity for c in self.checks)]))

    def uses_ensemble(self) -> bool:
        return any("ensemble:" in q for q in self.quantities())


def lab_names(lab_dir: Path = LAB_DIR) -> list[str]:
    return sorted(p.stem for p in lab_dir.glob("*.yaml"))


def load_lab(name: str, lab_dir: Path = LAB_DIR) -> Lab:
    """The lab `name`, checked; a UserError naming the file and the problem otherwise."""
    path = lab_dir / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"There is no lab named '{name}'.",
                        f"Labs: {', '.join(lab_names(lab_dir))}. `dlrun lab=list` shows each one's claim.",
                        title="Unknown lab")
    try:
        data = yaml.safe_load(path.read_text())
        return _lab_from(name, data, path)
    except (yaml.YAMLError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"{path}: {err}", "Each lab file follows the layout in dlrun/lab/spec.py.",
                        title="Invalid lab") from None


def _lab_from(name: str, data: Any, path: Path) -> Lab:
    if not isinstance(data, dict):
        raise ValueError("expected a mapping of claim, source, factor, levels, sizes, verdict")
    unknown = set(data) - _KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; a lab has {sorted(_KEYS)}")
    for key in ("claim", "source", "factor", "levels", "sizes", "verdict"):
        if key not in data:
            raise ValueError(f"'{key}' is missing")
    levels = _strings(data["levels"], "levels")
    fixed = _strings(data.get("fixed", []), "fixed")
    if not isinstance(data["sizes"], dict) or set(data["sizes"]) != set(SIZES):
        raise ValueError(f"'sizes' must define exactly {', '.join(SIZES)}")
    sizes = {size: _size(size, spec, levels, fixed) for size, spec in data["sizes"].items()}
    if not isinstance(data["verdict"], list) or not data["verdict"]:
        raise ValueError("'verdict' is a list of checks")
    checks = tuple(parse_check(item) for item in data["verdict"])
    for size_name, size in sizes.items():
        for check in checks:
            missing = {check.level, check.than_level} - set(size.levels) - {None}
            if missing:
                raise ValueError(f"the verdict names level(s) {sorted(missing)}, which size {size_name} does not run "
                                 f"(its levels: {', '.join(size.levels)})")
    measure = str(data.get("measure", checks[0].quantity))
    parse_quantity(measure)
    return Lab(name=name, claim=str(data["claim"]).strip(), source=str(data["source"]).strip(),
               factor=str(data["factor"]), sizes=sizes, checks=checks, measure=measure,
               curves=str(data.get("curves", "val/loss")), log_scale=bool(data.get("log_scale", False)), path=path)


def _size(name: str, spec: Any, levels: list[str], fixed: list[str]) -> Size:
    if not isinstance(spec, dict) or "seeds" not in spec:
        raise ValueError(f"size '{name}' needs at least 'seeds'")
    unknown = set(spec) - _SIZE_KEYS
    if unknown:
        raise ValueError(f"size '{name}': unknown keys {sorted(unknown)}; a size has {sorted(_SIZE_KEYS)}")
    seeds = spec["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"size '{name}': seeds is a list of integers >= 0")
    own_levels = _strings(spec.get("levels", levels), f"sizes.{name}.levels")
    return Size(levels=tuple(own_levels), seeds=tuple(seeds),
                fixed=(*fixed, *_strings(spec.get("fixed", []), f"sizes.{name}.fixed")), takes=str(spec.get("takes", "")))


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"'{where}' is a list of values")
    return [str(v) for v in value]
