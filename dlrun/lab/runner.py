"""`dlrun lab=<name>`: run a lab's sweep in its lab directory, judge the claim, write the report.

    dlrun lab=list                          every lab: its claim, the notes' section, how long it takes
    dlrun lab=xor                           quick size (the default): a few minutes at most on a laptop CPU
    dlrun lab=xor lab.size=full             the settings under which the claim shows most clearly
    dlrun lab=xor lab.resume=<lab dir>      run what did not complete, then judge again
    dlrun lab=xor hardware=gpu              other overrides go to every job of the sweep

The sweep is an ordinary `dlrun -m` grid sweep (factor levels x seeds, the lab's fixed settings), run as
its own process into the lab directory, so it is resumable like any sweep (`sweep.resume`). The verdict
reads only the job directories' summary.json and metrics.csv. Imports no torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from rich.table import Table

from dlrun.command_line import quoted
from dlrun.console import console, err_console
from dlrun.error_boundary import traceback_env
from dlrun.errors import UserError
from dlrun.lab.report import write_report
from dlrun.lab.spec import SIZES, Lab, lab_names, load_lab
from dlrun.lab.verdict import HELD, NOT_HELD, LabJob, Verdict, judge
from dlrun.rundir import check_output_root_writable, read_summary_file, write_atomic
from dlrun.trust import check_overrides

RECORD_FILE = "lab.json"  # what ran in this lab directory: the lab, the size, the commands
VERDICT_FILE = "lab_verdict.json"
_SETTINGS = ("lab", "lab.size", "lab.resume", "lab.n_jobs")
_COLOUR = {HELD: "green", NOT_HELD: "red"}


def is_lab_command(args: list[str]) -> bool:
    return any(arg.split("=", 1)[0] in _SETTINGS for arg in args)


def main(args: list[str]) -> int:
    """Run `dlrun lab=...` with the command line's arguments; the exit code (UserError for bad input)."""
    settings, overrides = _split(args)
    name = settings.get("lab")
    if name == "list":
        print_lab_list()
        return 0
    resume = settings.get("lab.resume")
    record = _read_record(Path(resume)) if resume else None
    if record is not None:
        if name not in (None, record["lab"]) or settings.get("lab.size", record["size"]) != record["size"]:
            raise UserError(f"{resume} holds lab={record['lab']} lab.size={record['size']}.",
                            f"Resume it as it was: dlrun lab.resume={resume}", title="Cannot resume the lab")
        name, size, overrides = record["lab"], record["size"], [*record["overrides"], *overrides]
    else:
        size = settings.get("lab.size", "quick")
    if name is None:
        raise UserError("Which lab? lab.size and lab.resume go with lab=<name>.",
                        "dlrun lab=list shows every lab.", title="No lab named")
    lab = load_lab(name)
    if size not in SIZES:
        raise UserError(f"lab.size={size}: a lab has the sizes {', '.join(SIZES)}.", "dlrun lab=xor lab.size=full",
                        title="Unknown lab size")
    n_jobs = settings.get("lab.n_jobs", "2")
    if not n_jobs.isdigit() or int(n_jobs) < 1:
        raise UserError(f"lab.n_jobs={n_jobs}: expected an integer >= 1 (jobs run at once)", "lab.n_jobs=2")
    check_output_root_writable(overrides)
    lab_dir = Path(resume) if resume else _new_lab_dir(lab, size, overrides)
    command = " ".join(["dlrun", *args])
    sweep = sweep_command(lab, size, overrides, lab_dir, int(n_jobs), resume=record is not None)
    if record is None:
        write_atomic(lab_dir / RECORD_FILE, json.dumps(
            {"lab": lab.name, "size": size, "overrides": overrides, "command": command,
             "sweep_command": " ".join(sweep[3:])}, indent=2) + "\n")
    console.print(f"[bold]lab {lab.name}[/bold] ({size}): {lab.claim}\n[dim]{lab.source} · {lab_dir}[/dim]",
                  highlight=False)
    try:
        code = subprocess.run(sweep, env={**os.environ, **traceback_env()}).returncode
    except KeyboardInterrupt:
        err_console.print(f"interrupted: continue with  dlrun lab.resume={lab_dir}")
        return 130
    if code == 2:  # a config error: the sweep printed its panel; nothing ran
        return 2
    if code not in (0, 1) or not any(lab_dir.glob("*/summary.json")):
        err_console.print(f"the sweep ended with exit code {code}: continue with  dlrun lab.resume={lab_dir}")
        return code
    record = _read_record(lab_dir)
    conclude(lab, size, lab_dir, command=record.get("command", command), sweep=record.get("sweep_command", ""))
    return 0 if code == 0 else 1


def conclude(lab: Lab, size: str, lab_dir: Path, command: str, sweep: str = "") -> Verdict:
    """Judge the lab from its directory's jobs, write the report and figures, print the verdict line."""
    jobs = read_jobs(lab, size, lab_dir)
    if lab.uses_ensemble():
        add_ensembles(jobs, lab_dir)
    verdict = judge(lab.checks, jobs, lab.sizes[size].seeds, lab.factor)
    write_report(lab, size, lab_dir, jobs, verdict, command, sweep)
    write_atomic(lab_dir / VERDICT_FILE, json.dumps({
        "lab": lab.name, "size": size, "verdict": verdict.outcome,
        "checks": [{"check": r.check.describe(lab.factor), "outcome": r.outcome, "passed": r.passed, "judged": r.judged,
                    "missing_seeds": r.missing, "values": r.left, "other_level_values": r.other,
                    "compared_with": r.right} for r in verdict.results],
    }, indent=2) + "\n")
    colour = _COLOUR.get(verdict.outcome, "yellow")
    console.print(f"[bold {colour}]{lab.name}: {verdict.outcome}[/bold {colour}] · "
                  + "; ".join(r.explain() for r in verdict.results), highlight=False, soft_wrap=True)
    console.print(f"report: {lab_dir / 'lab_report.md'}", highlight=False)
    return verdict


def sweep_command(lab: Lab, size: str, overrides: list[str], lab_dir: Path, n_jobs: int, resume: bool) -> list[str]:
    """`dlrun -m <factor>=<levels> seed=<seeds> <fixed> <overrides>` into the lab directory."""
    spec = lab.sizes[size]
    where = f"sweep.resume={quoted(lab_dir)}" if resume else f"hydra.sweep.dir={quoted(lab_dir)}"
    return [sys.executable, "-m", "dlrun.cli", "-m", f"{lab.factor}={','.join(spec.levels)}",
            f"seed={','.join(map(str, spec.seeds))}", *spec.fixed, *overrides, "print_config=false",
            f"hydra.launcher.n_jobs={n_jobs}", where]


def read_jobs(lab: Lab, size: str, lab_dir: Path) -> list[LabJob]:
    """The lab's jobs in `lab_dir`, each with its level and seed (read from the job's own overrides)."""
    jobs = []
    for path in sorted(lab_dir.glob("*/summary.json")):
        summary = read_summary_file(path)
        if summary is None or path.parent.name.startswith("."):
            continue
        given = dict(o.lstrip("+").split("=", 1) for o in summary.overrides if "=" in o)
        level = next((lv for lv in lab.sizes[size].levels if _same_value(given.get(lab.factor), lv)), None)
        seed = given.get("seed", "")
        if level is not None and seed.isdigit():
            jobs.append(LabJob(level=level, seed=int(seed), summary=summary, path=path.parent))
    return jobs


def _same_value(recorded: str | None, level: str) -> bool:
    """Whether a job's recorded override value is the level: Hydra records `false` as `False`, `1e-2` as
    `0.01`, so booleans compare without case and numbers as numbers."""
    if recorded is None:
        return False
    if recorded == level or recorded.lower() == level.lower() in ("true", "false"):
        return True
    try:
        return float(recorded) == float(level)
    except ValueError:
        return False


def add_ensembles(jobs: list[LabJob], lab_dir: Path) -> None:
    """Give each job its level's ensemble metrics on the test split: dlrun-eval's model averaging over the
    level's completed runs, written to ensemble_<level>.json (kept, so a resumed lab does not redo it)."""
    for level in dict.fromkeys(job.level for job in jobs):
        members = [job for job in jobs if job.level == level and job.summary.status == "completed"]
        path = lab_dir / f"ensemble_{level}.json"
        if not path.is_file() and len(members) >= 2:
            from dlrun.evaluate import evaluate_ensemble  # torch, only for labs about ensembles

            evaluate_ensemble([job.path for job in members], split="test", json_path=path)
        try:
            metrics = json.loads(path.read_text())["ensemble"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for job in members:
            job.ensemble = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def print_lab_list() -> None:
    table = Table("lab", "claim", "source", "quick", header_style="bold", show_lines=True)
    for name in lab_names():
        lab = load_lab(name)
        table.add_row(name, lab.claim, lab.source, lab.sizes["quick"].takes)
    console.print(table)
    console.print("Run one: dlrun lab=<lab>  (lab.size=full for the longer version)", highlight=False)


def _split(args: list[str]) -> tuple[dict[str, str], list[str]]:
    settings, overrides = {}, []
    for arg in args:
        key, eq, value = arg.partition("=")
        if key in _SETTINGS and eq:
            settings[key] = value.strip("'\"")
        elif key.startswith("lab.") or key == "lab":
            raise UserError(f"{arg}: a lab takes {', '.join(s + '=' for s in _SETTINGS)}",
                            "dlrun lab=xor lab.size=quick", title="Unknown lab setting")
        elif arg in ("-m", "--multirun") or arg.startswith("-"):
            raise UserError(f"{arg}: a lab runs its own sweep; give it lab settings and overrides only.",
                            "dlrun lab=xor  (other key=value overrides go to every job)", title="Not for a lab")
        else:
            overrides.append(arg)
    return settings, overrides


def _new_lab_dir(lab: Lab, size: str, overrides: list[str]) -> Path:
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("paths.output_dir=")]
    root = Path(given[-1] if given else os.environ.get("DLRUN_OUTPUT_DIR", "outputs"))
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    return (root / "labs" / f"{lab.name}_{size}_{stamp}").absolute()


def _read_record(lab_dir: Path) -> dict:
    record_file = lab_dir / RECORD_FILE
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        raise UserError(f"lab.resume={lab_dir}: no readable {RECORD_FILE} there, so it is not a lab directory.",
                        "Give the directory an earlier `dlrun lab=...` printed.", title="Cannot resume the lab") from None
    ok = (isinstance(record, dict) and isinstance(record.get("lab"), str) and record.get("size") in SIZES
          and isinstance(record.get("overrides"), list) and all(isinstance(o, str) for o in record["overrides"]))
    if not ok:
        raise UserError(f"{record_file} is not a lab record.", "Give the directory an earlier `dlrun lab=...` printed.",
                        title="Cannot resume the lab")
    check_overrides(record["overrides"], lab_dir)  # replayed from a directory: untrusted
    return record
