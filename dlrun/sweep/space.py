"""A sweep's search space, checked before the sweeper starts: `dlrun -m` refuses a space that has nothing
to draw from (a range written high-to-low, a log range reaching zero, an empty choice or range) with exit 2,
instead of letting Optuna or Hydra fail on it after the sweep has begun."""

from __future__ import annotations

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import OverrideParseException

from dlrun.errors import UserError

_HINT = ("Search ranges look like 'optim.lr=tag(log,interval(1e-4,1e-1))' (low, high; log bounds > 0), "
         "'model.width=range(32,257,32)' or 'model=mlp,cnn'.")


def check_search_space(overrides: list[str]) -> None:
    """Refuse the sweep overrides among `overrides` (the command line) that define an empty search space."""
    candidates = [o for o in overrides if not o.startswith("-") and "=" in o]
    try:
        parsed = OverridesParser.create().parse_overrides(candidates)
    except OverrideParseException as err:
        raise UserError(str(err).split("\nSee https://")[0], _HINT, title="Invalid search space") from err
    problems = []
    for override in parsed:
        if override.get_key_element() == "sweep.resume" and isinstance(override.value(), str):
            where = Path(override.value()).expanduser()
            if where.exists() and not where.is_dir():
                raise UserError(f"sweep.resume = {where}: a file, not a sweep directory.",
                                "Give the directory of an earlier sweep, e.g. outputs/sweeps/2026-01-31_12-00-00_123456.",
                                title="Not a sweep directory")
        if not override.is_sweep_override():
            continue
        key, value = override.get_key_element(), override.value()
        if isinstance(value, IntervalSweep):
            if not value.start < value.end:
                problems.append(f"{key} = interval({value.start}, {value.end}): the low bound comes first and must "
                                "be below the high bound")
            if "log" in value.tags and value.start <= 0:
                problems.append(f"{key} = tag(log, interval({value.start}, {value.end})): a log range must start "
                                "above 0")
        elif isinstance(value, RangeSweep) and not list(_range_values(value)):
            problems.append(f"{key} = range({value.start}, {value.stop}, {value.step}): the range is empty")
        elif isinstance(value, ChoiceSweep) and not value.list:
            problems.append(f"{key}: the choice is empty")
    if problems:
        raise UserError("\n".join(problems), _HINT, title="Invalid search space")


def _range_values(value: RangeSweep):
    if not value.step:
        return []
    start, step = value.start, value.step
    return [start] if (value.stop - start) * step > 0 else []
