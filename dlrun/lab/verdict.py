"""The verdict rules of labs: quantities read from a job's summary.json and metrics.csv, checks that
compare them, and the verdict (held / did not hold / inconclusive). Imports no torch.

A quantity names what to read from one job:

    test/acc                  summary.json's metrics: the tested model's (the best epoch's train/val, test/*)
    last:val/loss             the last epoch's metric
    min:val/loss, max:val/acc the smallest or largest value of a metrics.csv column
    at_epoch:lr@3             a metrics.csv column at one epoch (epochs count from 0)
    epochs_to:val/acc>=0.9    how many epochs it took to reach the value (inf: never)
    epochs, best_epoch, best_value
    diverged                  1 when the run diverged, else 0
    ensemble:test/acc         the metric of the ensemble of the level's runs (004 §5.7; dlrun-eval's model
                              averaging, computed once the sweep is done): the same for every seed of a level
    val/loss - train/loss     the difference of two quantities

A check compares one level's quantity with a number, or with another level's quantity of the same seed:

    {level: mlp, quantity: test/acc, is: ">=", than: 1.0}
    {level: momentum, quantity: last:val/loss, is: "<", than_level: sgd, times: 0.1}   # < 0.1 x sgd's
    {level: lstm, quantity: test/acc, is: ">=", than_level: rnn, by: 0.2}              # >= rnn's + 0.2
    {level: relu, quantity: test/acc, is: ">", than: 0.9, over_seeds: mean}           # the mean over seeds

`over_seeds: every` (the default) judges each seed: the check holds when every seed passes, does not hold
when none does, and is inconclusive when seeds disagree (or a job has no value). `over_seeds: mean`
compares the means over seeds once. The lab's verdict: did not hold if any check did not hold, else
inconclusive if any was, else held. `==` takes a tolerance, `tol` (absolute).
"""

from __future__ import annotations

import math
import operator
import re
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlrun.curves import read_metrics
from dlrun.run_summary import RunSummary

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
}
_SYMBOL = {"<=": "≤", ">=": "≥", "==": "="}
_SUMMARY_FIELDS = ("epochs", "best_epoch", "best_value")
_CHECK_KEYS = {"level", "quantity", "is", "than", "than_level", "times", "by", "over_seeds", "tol"}


@dataclass
class LabJob:
    """One job of a lab's sweep: its factor level, its seed, its summary and its directory."""

    level: str
    seed: int
    summary: RunSummary
    path: Path | None = None
    ensemble: dict[str, float] | None = None  # the metrics of the ensemble of this job's level, when the lab asks
    _columns: dict[str, list[float]] | None = field(default=None, repr=False)

    def columns(self) -> dict[str, list[float]]:
        """metrics.csv as columns (read once)."""
        if self._columns is None:
            self._columns = read_metrics(self.path / "metrics.csv") if self.path is not None else {}
        return self._columns


Quantity = Callable[[LabJob], "float | None"]


def parse_quantity(text: str) -> Quantity:
    """The function that reads `text` (see the module's docstring) from a job; ValueError when unreadable."""
    if " - " in text:
        left, right = (parse_quantity(part.strip()) for part in text.split(" - ", 1))
        return lambda job: _minus(left(job), right(job))
    kind, sep, arg = text.partition(":")
    if not sep:
        if text == "diverged":
            return lambda job: 1.0 if job.summary.status == "diverged" else 0.0
        if text in _SUMMARY_FIELDS:
            return lambda job: _number(getattr(job.summary, text))
        if not re.fullmatch(r"(train|val|test|train_eval)/\w+|lr", text):
            raise ValueError(f"quantity '{text}': not a metric (stage/name), a summary field "
                             f"({', '.join(_SUMMARY_FIELDS)}, diverged) or kind:argument")
        return lambda job: _number(job.summary.metrics.get(text))
    if kind == "ensemble":
        return lambda job: _number((job.ensemble or {}).get(arg))
    if kind == "last":
        return lambda job: _number(((job.summary.last_epoch or {}).get("metrics") or {}).get(arg))
    if kind in ("min", "max"):
        pick = min if kind == "min" else max
        return lambda job: _number(pick(_finite(job.columns().get(arg, [])), default=None))
    if kind == "at_epoch":
        column, at, epoch = arg.partition("@")
        if not at or not epoch.isdigit():
            raise ValueError(f"quantity '{text}': at_epoch takes column@epoch, e.g. at_epoch:lr@3")
        return lambda job: _at_epoch(job.columns(), column, int(epoch))
    if kind == "epochs_to":
        match = re.fullmatch(r"(.+?)(<=|>=|<|>)(.+)", arg)
        if match is None:
            raise ValueError(f"quantity '{text}': epochs_to takes column, comparison and value, e.g. epochs_to:val/acc>=0.9")
        column, op, value = match[1], _OPS[match[2]], float(match[3])
        return lambda job: _epochs_to(job.columns(), column, op, value)
    raise ValueError(f"quantity '{text}': unknown kind '{kind}' (last, min, max, at_epoch, epochs_to, ensemble)")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _at_epoch(columns: Mapping[str, list[float]], column: str, epoch: int) -> float | None:
    for e, value in zip(columns.get("epoch", []), columns.get(column, []), strict=False):
        if int(e) == epoch and not math.isnan(value):
            return value
    return None


def _epochs_to(columns: Mapping[str, list[float]], column: str, op: Callable, value: float) -> float | None:
    if column not in columns:
        return None
    for e, v in zip(columns.get("epoch", []), columns[column], strict=False):
        if not math.isnan(v) and op(v, value):
            return int(e) + 1.0
    return math.inf


@dataclass(frozen=True)
class Check:
    """One comparison of a verdict rule (see the module's docstring)."""

    level: str
    quantity: str
    op: str
    than: float | None = None
    than_level: str | None = None
    times: float = 1.0
    by: float = 0.0
    over_seeds: str = "every"
    tol: float = 0.0

    def describe(self, factor: str = "") -> str:
        """The check in words; with the lab's factor, levels read as factor=level."""
        right = format_number(self.than) if self.than_level is None else (
            (f"{format_number(self.times)} × " if self.times != 1 else "") + f"{_named(factor, self.than_level)}'s"
            + (f" + {format_number(self.by)}" if self.by else ""))
        where = "in every seed" if self.over_seeds == "every" else "on the mean over seeds"
        return f"{_named(factor, self.level)}: {self.quantity} {_SYMBOL.get(self.op, self.op)} {right} {where}"

    def passes(self, left: float, right: float) -> bool:
        if self.op == "==":
            return abs(left - right) <= self.tol
        return _OPS[self.op](left, right)


def _named(factor: str, level: str) -> str:
    return f"{factor}={level}" if factor else level


def parse_check(item: Any) -> Check:
    if not isinstance(item, dict):
        raise ValueError(f"a verdict check is a mapping, not {item!r}")
    unknown = set(item) - _CHECK_KEYS
    if unknown:
        raise ValueError(f"verdict check {item}: unknown keys {sorted(unknown)}; a check has {sorted(_CHECK_KEYS)}")
    for key in ("level", "quantity", "is"):
        if key not in item:
            raise ValueError(f"verdict check {item}: '{key}' is missing")
    if item["is"] not in _OPS:
        raise ValueError(f"verdict check {item}: 'is' must be one of {', '.join(_OPS)}")
    if ("than" in item) == ("than_level" in item):
        raise ValueError(f"verdict check {item}: give either 'than' (a number) or 'than_level' (another level)")
    if item.get("over_seeds", "every") not in ("every", "mean"):
        raise ValueError(f"verdict check {item}: over_seeds is 'every' or 'mean'")
    parse_quantity(str(item["quantity"]))
    return Check(level=str(item["level"]), quantity=str(item["quantity"]), op=item["is"],
                 than=float(item["than"]) if "than" in item else None,
                 than_level=str(item["than_level"]) if "than_level" in item else None,
                 times=float(item.get("times", 1.0)), by=float(item.get("by", 0.0)),
                 over_seeds=item.get("over_seeds", "every"), tol=float(item.get("tol", 0.0)))


@dataclass
class CheckResult:
    check: Check
    outcome: str
    passed: int  # seeds that passed (every), or 1/0 (mean)
    judged: int  # seeds with a value on both sides
    missing: list[int]  # seeds without a value (a failed job, a metric the run did not log)
    left: list[float]  # the level's values, one per judged seed
    right: list[float]  # what each is compared with: the number, or the other level's value x times + by
    other: list[float] = field(default_factory=list)  # the other level's own values
    factor: str = ""  # the lab's factor, to name the levels

    def explain(self) -> str:
        """The check, the numbers, and how many seeds passed."""
        c = self.check
        values = f"{c.quantity} {mean_std(self.left)}"
        if c.than_level is not None:
            values += f" vs {mean_std(self.other)}"
        if c.over_seeds == "every":
            tally = f"{self.passed}/{self.judged} seeds pass"
        else:
            tally = "the means pass" if self.passed else "the means fail"
        missing = f"; no value for seed(s) {', '.join(map(str, self.missing))}" if self.missing else ""
        return f"{c.describe(self.factor)}: {values}: {tally}{missing}"


@dataclass
class Verdict:
    outcome: str
    results: list[CheckResult]

    def line(self) -> str:
        return f"{self.outcome}: " + "; ".join(r.explain() for r in self.results)


def judge(checks: tuple[Check, ...] | list[Check], jobs: list[LabJob], seeds: tuple[int, ...] | list[int],
          factor: str = "") -> Verdict:
    """Apply every check to the jobs (each identified by level and seed) and combine the outcomes."""
    by_key = {(job.level, job.seed): job for job in jobs}
    results = [_judge_one(check, by_key, seeds) for check in checks]
    for result in results:
        result.factor = factor
    outcomes = {r.outcome for r in results}
    outcome = NOT_HELD if NOT_HELD in outcomes else INCONCLUSIVE if INCONCLUSIVE in outcomes else HELD
    return Verdict(outcome, results)


def _judge_one(check: Check, jobs: Mapping[tuple[str, int], LabJob], seeds) -> CheckResult:
    read = parse_quantity(check.quantity)

    def value(level: str, seed: int) -> float | None:
        job = jobs.get((level, seed))
        return None if job is None else read(job)

    left, right, other, missing = [], [], [], []
    for seed in seeds:
        a = value(check.level, seed)
        b = check.than if check.than_level is None else value(check.than_level, seed)
        if a is None or b is None:
            missing.append(seed)
            continue
        left.append(a)
        right.append(b if check.than_level is None else b * check.times + check.by)
        other += [] if check.than_level is None else [b]
    if check.over_seeds == "mean":
        if not left:
            return CheckResult(check, INCONCLUSIVE, 0, 0, missing, left, right, other)
        ok = check.passes(_mean(left), _mean(right))
        return CheckResult(check, HELD if ok else NOT_HELD, int(ok), len(left), missing, left, right, other)
    passed = sum(check.passes(a, b) for a, b in zip(left, right, strict=True))
    if passed == len(left) and not missing:
        outcome = HELD
    elif passed == 0 and not missing:
        outcome = NOT_HELD
    else:
        outcome = INCONCLUSIVE
    return CheckResult(check, outcome, passed, len(left), missing, left, right, other)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def mean_std(values: list[float]) -> str:
    """'0.75 ± 0.02' (the sample standard deviation over seeds; ± 0 for one seed), '—' for none."""
    if not values:
        return "—"
    if not all(math.isfinite(v) for v in values):
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return f"∞ in all {len(values)}"
        return f"{mean_std(finite)} (∞ in {len(values) - len(finite)} of {len(values)})"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format_number(_mean(values))} ± {format_number(std)}"


def format_number(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞"
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.2e}"
