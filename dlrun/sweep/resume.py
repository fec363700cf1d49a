"""`sweep.resume=<sweep dir>`: what each job's earlier attempt left, and whether the command is still the sweep's.

A job directory says how its last attempt ended. A result (completed, diverged, ...) is kept and
skipped. An attempt that stopped midway (interrupted, or killed before it could write a summary) and
left a last checkpoint continues from it with `dlrun resume=<job dir>`, exactly as a single run
does. A failed attempt is set aside (into `.attempts/`) and the job starts again, as long as it has
failed at most `hydra.launcher.retries` times. The sweep's command is recorded in the sweep
directory at its first launch; a resume with another command would mix two experiments in one
sweep, so it is refused.
"""

from __future__ import annotations

import difflib
import glob
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from dlrun.errors import UserError
from dlrun.run_summary import RESUMABLE, RunSummary
from dlrun.rundir import RunDir, read_summary_file, write_atomic

SWEEP_COMMAND = "sweep_command.yaml"  # the sweep's arguments, recorded at its first launch
ATTEMPTS = ".attempts"  # earlier failed attempts of the sweep's jobs, moved aside before a retry


class SweepChanged(UserError):
    """`sweep.resume` with a command other than the sweep's own."""


@dataclass
class Earlier:
    """What a job's earlier attempt left: `action` is one of
    `skip` (a result), `give_up` (failed more than `retries` times), `continue` (from its last
    checkpoint), `retry` (failed: start again) or `start` (nothing usable: start afresh)."""

    action: str
    summary: RunSummary | None = None
    failures: int = 0


def earlier_attempt(job_dir: Path, retries: int) -> Earlier:
    """How a resumed sweep goes on with the job in `job_dir` (see the module's docstring)."""
    summary = read_summary_file(job_dir / "summary.json")
    status = summary.status if summary is not None else "running"  # no summary: killed before writing it
    if status not in RESUMABLE:
        return Earlier("skip", summary)
    if status == "failed":
        failures = 1 + len(glob.glob(glob.escape(str(job_dir.parent / ATTEMPTS / job_dir.name)) + ".*"))
        return Earlier("retry" if failures <= retries else "give_up", summary, failures)
    if job_dir.is_dir():  # (RunDir makes the directory it is given)
        run_dir = RunDir(job_dir)
        if run_dir.checkpoint("last").is_file() and run_dir.config_file.is_file():
            return Earlier("continue", summary)
    return Earlier("start")


def set_aside(job_dir: Path) -> None:
    """Move an earlier attempt out of the way (into `.attempts/<name>.<n>`), so that a re-run starts clean."""
    if not job_dir.exists():
        return
    attempts = job_dir.parent / ATTEMPTS
    attempts.mkdir(exist_ok=True)
    n = 1
    while (attempts / f"{job_dir.name}.{n}").exists():
        n += 1
    shutil.move(str(job_dir), attempts / f"{job_dir.name}.{n}")


def check_sweep_command(sweep_dir: Path, command: list[str], resuming: bool) -> None:
    """Record the sweep's command (`command`: config source, Hydra settings and overrides that shape its
    jobs) at its first launch; on resume, refuse a command that differs from the recorded one."""
    path = sweep_dir / SWEEP_COMMAND
    try:
        recorded = yaml.safe_load(path.read_text()) if resuming else None
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        recorded = None  # a sweep from before the record: this command becomes its record
    if isinstance(recorded, dict) and recorded.get("command") != command:
        before = [str(a) for a in recorded.get("command") or []]
        diff = [line for line in difflib.unified_diff(before, command, lineterm="", n=0)
                if not line.startswith(("---", "+++", "@@"))]
        raise SweepChanged(
            f"sweep.resume={sweep_dir}: the command differs from the sweep's own ({path.name}):\n"
            + "\n".join(diff),
            "Resume with the sweep's own arguments (lines with -), or start a new sweep without sweep.resume.",
            title="Not the same sweep",
        )
    write_atomic(path, yaml.safe_dump({"command": command}, sort_keys=False))
