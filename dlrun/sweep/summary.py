"""One summary of a sweep directory, built from its jobs' `summary.json` files and nothing else.

    <sweep dir>/sweep_summary.csv    one row per job: overrides, swept values, status, best monitored
    <sweep dir>/sweep_summary.json   value, test metrics, epochs, seconds, start/end times, error

plus the pictures of dlrun/sweep/pictures.py (optimization history, the metric against each swept key,
every job's learning curve, parameter importances) and a table in the terminal, sorted by the metric, and mean ± std over seeds for jobs that differ
only by `seed`. Because it reads only the job directories, the summary of a sweep that crashed, was
killed or was resumed is as good as any: `dlrun-summary <sweep dir>` rebuilds and prints it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from dlrun.console import console, print_user_error, show_value
from dlrun.error_boundary import boundary
from dlrun.errors import UserError
from dlrun.metrics import headline_test_names
from dlrun.run_summary import RunSummary
from dlrun.rundir import read_summary_file, write_atomic
from dlrun.sweep.pictures import upload_to_wandb, write_pictures

CSV_FILE = "sweep_summary.csv"
JSON_FILE = "sweep_summary.json"
_CSV_ERROR_CHARS = 500  # the CSV keeps the error on one line; the JSON keeps all of it
_FIXED_COLUMNS = ("job", "status", "overrides")
_RESULT_COLUMNS = ("monitor", "best_value", "best_epoch", "epochs", "seconds", "started_at", "finished_at")


def parse_value(text: str) -> Any:
    """An override's value as a number where it is one (so that plots and sorting see numbers)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def params_of(overrides: list[str]) -> dict[str, Any]:
    """{key: value} of a job's overrides: `optim.lr=0.01` -> {'optim.lr': 0.01}."""
    params = {}
    for item in overrides:
        key, _, value = item.partition("=")
        params[key.lstrip("+~")] = parse_value(value)
    return params


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of `sweep_dir` that holds a summary.json, in job order."""
    rows = []
    for path in sorted(Path(sweep_dir).glob("*/summary.json")):
        if path.parent.name.startswith("."):
            continue
        summary = read_summary_file(path)
        if summary is None:  # truncated or not JSON (a job killed mid-write by an older dlrun, a full disk)
            summary = RunSummary(status="unreadable", error=f"{path} cannot be read: truncated or not JSON")
        num = (summary.sweep_job or {}).get("num")
        if not isinstance(num, int):
            prefix = path.parent.name.split("_", 1)[0]
            num = int(prefix) if prefix.isdigit() else None
        rows.append({
            "job": num,
            "status": summary.status,
            "overrides": " ".join(summary.overrides),
            "params": params_of(summary.overrides),
            "monitor": summary.monitor,
            "mode": summary.mode,
            "best_value": _number(summary.best_value),
            "best_epoch": summary.best_epoch,
            "epochs": summary.epochs,
            "seconds": summary.wall_seconds,
            "started_at": summary.started_at,
            "finished_at": summary.finished_at,
            "test": {k: v for k, v in sorted(summary.metrics.items()) if k.startswith("test/")},
            "error": (summary.error or "").strip(),
            "dir": path.parent.name,
        })
    return sorted(rows, key=lambda r: (r["job"] is None, r["job"] if r["job"] is not None else 0, r["dir"]))


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Keys whose value differs between jobs (all of a lone job's keys), in first-seen order."""
    keys = list(dict.fromkeys(k for row in rows for k in row["params"]))
    if len(rows) <= 1:
        return keys
    return [k for k in keys if len({repr(row["params"].get(k)) for row in rows}) > 1]


def objective(rows: list[dict[str, Any]]) -> tuple[str | None, str]:
    """(monitor, mode) of the sweep: what most of its jobs optimized."""
    pairs = Counter((r["monitor"], r["mode"] or "min") for r in rows if r["monitor"])
    return pairs.most_common(1)[0][0] if pairs else (None, "min")


def ranked(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Rows with a value first, best first; then the rest (failed jobs) in job order."""
    scored = [r for r in rows if _finite(r["best_value"])]
    scored.sort(key=lambda r: r["best_value"], reverse=mode == "max")
    return scored + [r for r in rows if not _finite(r["best_value"])]


def seed_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sample std (n-1) of the best value and test metrics over jobs that differ only by seed."""
    if "seed" not in swept_keys(rows):
        return []
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "completed" and _finite(row["best_value"]):
            config = " ".join(f"{k}={v}" for k, v in row["params"].items() if k != "seed")
            groups.setdefault(config, []).append(row)
    result = []
    for config, members in groups.items():
        stats = {"best_value": _mean_std([m["best_value"] for m in members])}
        for key in sorted({k for m in members for k in m["test"]}):
            stats[key] = _mean_std([m["test"].get(key) for m in members])
        result.append({"config": config, "n": len(members), "seeds": [m["params"].get("seed") for m in members],
                       **{f"{k}_mean": v[0] for k, v in stats.items()}, **{f"{k}_std": v[1] for k, v in stats.items()}})
    return result


def write_summary_files(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write sweep_summary.csv and .json from the job directories; return the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    monitor, mode = objective(rows)
    keys = swept_keys(rows)
    counts = Counter(r["status"] for r in rows)
    document = {
        "sweep_dir": str(sweep_dir.absolute()),
        "monitor": monitor,
        "mode": mode,
        "swept": keys,
        "counts": dict(counts),
        "jobs": rows,
        "seed_groups": seed_groups(rows),
    }
    write_atomic(sweep_dir / JSON_FILE, json.dumps(document, indent=2, default=str) + "\n")
    test_keys = sorted({k for r in rows for k in r["test"]})
    header = [*_FIXED_COLUMNS, *keys, *_RESULT_COLUMNS, *test_keys, "error", "dir"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for r in rows:
        writer.writerow([
            *(r[c] for c in _FIXED_COLUMNS), *(r["params"].get(k, "") for k in keys),
            *("" if r[c] is None else r[c] for c in _RESULT_COLUMNS),
            *(r["test"].get(k, "") for k in test_keys), " / ".join(r["error"].splitlines())[:_CSV_ERROR_CHARS], r["dir"],
        ])
    write_atomic(sweep_dir / CSV_FILE, buffer.getvalue())
    return rows


def headline_test_keys(rows: list[dict[str, Any]], monitor: str | None) -> list[str]:
    """The test metrics a terminal table has room for: the monitored metric's test twin, then the task's
    headline score (dlrun/metrics.py: HEADLINE), two in all; the summary files keep every one."""
    present = {k for r in rows for k in r["test"]}
    twin = f"test/{monitor.split('/', 1)[-1]}" if monitor else None
    preferred = dict.fromkeys(k for k in (twin, *headline_test_names()) if k in present)
    return list(preferred)[:2]


def print_summary(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    """The rich table of a sweep, best first, then the seed aggregates."""
    monitor, mode = objective(rows)
    keys = swept_keys(rows)
    test_keys = headline_test_keys(rows, monitor)
    table = Table(title=f"sweep {Path(sweep_dir).name}", header_style="bold", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, caption_justify="left",
                  caption=f"ranked by {monitor or 'best value'} ({mode}) · every test metric: {CSV_FILE}")
    for column in ("job", *keys, "status", monitor or "best", *test_keys, "epochs", "seconds"):
        table.add_column(column, justify="left" if column in ("status", *keys) else "right")
    for i, r in enumerate(ranked(rows, mode)):
        status = {"completed": "[green]completed[/green]", "failed": "[red]failed[/red]",
                  "pruned": "[yellow]pruned[/yellow]",  # a result: the pruner stopped it after `epochs`
                  "unreadable": "[yellow]unreadable[/yellow]"}.get(r["status"], r["status"])
        table.add_row(
            str(r["job"]), *(show_value(r["params"].get(k)) for k in keys), status,
            ("★ " if i == 0 and _finite(r["best_value"]) else "") + show_value(r["best_value"]),
            *(show_value(r["test"].get(k)) for k in test_keys), show_value(r["epochs"]), show_value(r["seconds"]),
        )
    console.print(table)
    groups = seed_groups(rows)
    if groups:
        agg = Table(title="mean ± std over seeds", header_style="bold", title_justify="left", box=box.SIMPLE_HEAD)
        measures = ["best_value", *test_keys]
        for column in ("config", "seeds", *(monitor if m == "best_value" else m for m in measures)):
            agg.add_column(str(column), justify="left" if column in ("config", "seeds") else "right")
        for g in sorted(groups, key=lambda g: g["best_value_mean"], reverse=mode == "max"):
            agg.add_row(g["config"] or "(none)", str(g["n"]),
                        *(f"{show_value(g.get(f'{m}_mean'))} ± {show_value(g.get(f'{m}_std'))}" for m in measures))
        console.print(agg)
    for r in rows:
        if r["status"] in ("failed", "unreadable"):
            console.print(f"[red]job {r['job']} {r['status']}[/red] ({r['dir']}):", highlight=False)
            console.print(_last_lines(r["error"], 4), highlight=False, markup=False)


def report(sweep_dir: Path, to_wandb: bool = False) -> int:
    """Write the summary files and the pictures (also to W&B with `to_wandb`, when the jobs logged there),
    print the table; return the number of failed jobs."""
    sweep_dir = Path(sweep_dir)
    rows = write_summary_files(sweep_dir)
    pictures = write_pictures(sweep_dir, rows, swept_keys(rows), *objective(rows))
    print_summary(rows, sweep_dir)
    failed = sum(r["status"] == "failed" for r in rows)
    files = ", ".join([CSV_FILE, JSON_FILE, *(p.name for p in pictures)])
    console.print(f"{len(rows) - failed} of {len(rows)} jobs without failure · {files} in {sweep_dir}")
    uploaded = upload_to_wandb(sweep_dir, pictures, rows) if to_wandb else None
    if uploaded:
        console.print(f"[bold]W&B[/bold] the sweep's pictures: {uploaded}", soft_wrap=True, highlight=False)
    return failed


def end_of_sweeps() -> int | None:
    """After `dlrun -m`: report every sweep this process launched (its pictures also to W&B when its jobs logged
    there; `dlrun-summary` redraws them locally only); the number of failed jobs, or None
    when no sweep was launched (a single run, or a sweep refused before its first job)."""
    from dlrun.sweep.launcher import launched_sweeps

    if not launched_sweeps:
        return None
    return sum(report(sweep_dir, to_wandb=True) for sweep_dir in launched_sweeps)


def main(argv: list[str] | None = None) -> None:
    """`dlrun-summary <sweep dir>`: rebuild and print the summary of any sweep, finished or not."""
    parser = argparse.ArgumentParser(prog="dlrun-summary", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory, e.g. outputs/sweeps/2026-01-31_12-00-00_123")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir() or not any(args.sweep_dir.glob("*/summary.json")):
        print_user_error(UserError(f"{args.sweep_dir} is not a sweep directory (no job with a summary.json).",
                                   "Pass a sweep directory: outputs/sweeps/<date>_<time>.", title="Not a sweep directory"))
        sys.exit(2)
    with boundary():
        report(args.sweep_dir)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    kept = [v for v in values if _finite(v)]
    if not kept:
        return None, None
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def _last_lines(text: str, n: int) -> str:
    return "\n".join("  " + line for line in text.splitlines()[-n:])


if __name__ == "__main__":
    main()
