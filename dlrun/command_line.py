"""The command lines dlrun writes for a single run: a sweep's job, a DDP rank, a resumed run directory.

Each re-creates one run from a command that was something else (a sweep, a rank's parent process,
`resume=<run dir>`): it keeps the config sources and the user's Hydra settings, drops the settings
that only a sweep has (SWEEP_ONLY: `-m` and the sweep's comma lists would start a sweep again), and
names the run's directory itself. Imports no torch (the sweep launcher and the CLI use it).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from dlrun.errors import UserError
from dlrun.run_summary import RESUMABLE
from dlrun.rundir import RunDir, check_checkpoint_file
from dlrun.trust import check_overrides

# Hydra settings that configure a sweep (and may hold its comma lists): never in a single run's command.
SWEEP_ONLY = ("hydra.mode", "hydra.sweep", "hydra.sweeper", "hydra/sweeper", "hydra.launcher", "hydra/launcher")
# A rank > 0 logs nowhere: rank 0's dlrun.log is the run's log.
_NO_LOG_FILE = ("~hydra.job_logging.handlers", "hydra.job_logging.root.handlers=[]")


def _key_starts_with(override: str, prefixes: tuple[str, ...]) -> bool:
    return override.lstrip("+~").startswith(prefixes)


def single_run_settings(hydra_overrides: Iterable[str]) -> list[str]:
    """The Hydra overrides of a command line (hydra.overrides.hydra) that a single run keeps."""
    return [str(o) for o in hydra_overrides if not _key_starts_with(str(o), SWEEP_ONLY)]


def quoted(value: str | os.PathLike) -> str:
    """`value` as a Hydra quoted string. Inside quotes a backslash is literal, except before a quote:
    there (and at the end, before the closing quote) each one is doubled, and the quote escaped."""
    escaped = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), str(value))
    return f"'{escaped}'"


def as_typed(override: str) -> str:
    """An override as the user typed it, from the text Hydra's grid sweeper gives a job: that escapes ':',
    spaces, commas and brackets in a string value (`uri=http\\://host\\:5000`). The job reads both as the
    same value but records the text it got: in its overrides, its summary, its run's name. Where the
    plain text would read differently (a list, a sweep), the override stays as written."""
    if "\\" not in override:
        return override
    parser = OverridesParser.create()
    value = parser.parse_override(override).value()
    if not isinstance(value, str):  # a sweep, a list, a number: written as Hydra needs it
        return override
    plain = f"{override.split('=', 1)[0]}={value}"
    try:
        same = parser.parse_override(plain).value() == value
    except HydraException:  # the backslashes were needed (a value with brackets, say)
        return override
    return plain if same else override


# Sweep settings that change no job: a resumed sweep may give other values (sweep.n_trials: more trials).
_NOT_THE_SWEEPS_JOBS = ("sweep.resume=", "sweep.n_trials=")


def _config_source(sweep_hydra: DictConfig) -> list[tuple[str, str]]:
    """(flag, value) for --config-dir (where the command line gave one) and --config-name."""
    dirs = [("--config-dir", str(source.path).removeprefix("file://"))
            for source in sweep_hydra.runtime.config_sources if source.provider == "command-line"]
    return [*dirs, ("--config-name", str(sweep_hydra.job.config_name))]


def job_command(sweep_hydra: DictConfig, job_dir: Path, num: int, overrides: list[str]) -> list[str]:
    """A sweep's job as a single `dlrun` run in a fresh process: the sweep's config sources and Hydra
    settings, the job's own overrides, its directory and its number."""
    settings = [o for o in single_run_settings(sweep_hydra.overrides.hydra)
                if not _key_starts_with(o, ("hydra.run.dir",))]  # the job's directory follows
    source = [arg for flag_value in _config_source(sweep_hydra) for arg in flag_value]
    return [sys.executable, "-m", "dlrun.cli", *source, *settings, *overrides,
            f"hydra.run.dir={quoted(job_dir)}", f"hydra.job.num={num}"]


def job_resume_command(sweep_hydra: DictConfig, job_dir: Path) -> list[str]:
    """A sweep's interrupted job continued from its last checkpoint: `dlrun resume=<job dir>` (expand_resume
    replays the job's own overrides), with the sweep's config source for the group choices."""
    source = [f"{flag}={value}" for flag, value in _config_source(sweep_hydra)]  # one argument each (expand_resume)
    return [sys.executable, "-m", "dlrun.cli", *source, f"resume={quoted(job_dir)}"]


def sweep_command(sweep_hydra: DictConfig) -> list[str]:
    """What makes a sweep's jobs what they are: its config source, Hydra settings and overrides (what
    `sweep.resume` checks against the sweep's record; launcher settings and sweep.resume itself excluded)."""
    settings = [o for o in single_run_settings(sweep_hydra.overrides.hydra)
                if not _key_starts_with(o, ("hydra.run.",))]
    overrides = [str(o) for o in sweep_hydra.overrides.task if not str(o).startswith(_NOT_THE_SWEEPS_JOBS)]
    return [*(f"{flag}={value}" for flag, value in _config_source(sweep_hydra)), *settings, *overrides]


def rank_command(argv: list[str], hydra_cfg: DictConfig) -> list[str]:
    """The command line that re-creates this job, and only this job, as a single run without a log file:
    what a DDP rank started by this process runs (see dlrun/distributed.py)."""
    args = get_args_parser().parse_args(argv[1:])
    flags = [
        f"--{name.replace('_', '-')}={value}"
        for name, value in (
            ("config_path", args.config_path),
            ("config_name", args.config_name),
            ("config_dir", args.config_dir),
        )
        if value is not None
    ]
    settings = single_run_settings(hydra_cfg.overrides.hydra)
    return [argv[0], *flags, *settings, *hydra_cfg.overrides.task, "hydra.mode=RUN", *_NO_LOG_FILE]


def expand_resume(args: list[str]) -> list[str]:
    """`resume=<run dir>` -> the run's own overrides, resume=<run dir>, and its directory as Hydra's run dir.

    Composing the original overrides again gives Hydra the run's group choices (data set and model
    names); the CLI then swaps in the run's saved resolved config, so the continued run is the same
    experiment even if dlrun's defaults have changed since. Hydra's `.hydra/` record of the original
    composition is left as it is. Already expanded arguments (a DDP rank re-running the command
    line) pass through.
    """
    given = [a for a in args if a.startswith("resume=")]
    if not given or any(a.startswith("hydra.run.dir=") for a in args):
        return args
    hint = "Resume continues a run with its own config; to change the config, start a new run."
    others = [a for a in args if a not in given]
    if len(given) > 1 or any(not a.startswith("-") for a in others) or {"-m", "--multirun"} & set(others):
        raise UserError(f"resume takes one run directory and nothing else; got: {' '.join(args)}", hint,
                        title="Cannot resume")
    path = given[0].split("=", 1)[1].strip("'\"")
    run_dir = RunDir.existing(path)
    run_dir.read_config()  # readable, before anything else happens
    if run_dir.checkpoint("last").exists():
        check_checkpoint_file(run_dir.checkpoint("last"))  # before torch is imported
    summary = run_dir.read_summary_if_any()
    status = summary.status if summary is not None else "running"
    if status not in RESUMABLE:
        raise UserError(f"{run_dir.path} has status '{status}': there is nothing to resume.",
                        "dlrun-eval <run dir> evaluates it; a new run (another seed, a smaller optim.lr) tries again.",
                        title="Cannot resume")
    overrides = _read_list(run_dir.path / ".hydra" / "overrides.yaml") or _read_list(run_dir.path / "overrides.yaml")
    hydra_yaml = _read_yaml(run_dir.path / ".hydra" / "hydra.yaml")
    hydra_overrides = hydra_yaml.get("hydra", {}).get("overrides", {}).get("hydra", []) if isinstance(hydra_yaml, dict) else []
    search_path = [o for o in hydra_overrides or [] if str(o).startswith("hydra.searchpath")]  # the user's own configs
    check_overrides([*search_path, *overrides], run_dir.path)  # replayed from the directory: untrusted
    where = quoted(run_dir.path)
    return [*others, *search_path, *overrides, f"resume={where}", f"hydra.run.dir={where}", "hydra.output_subdir=null"]


def _read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None


def _read_list(path: Path) -> list[str]:
    data = _read_yaml(path)
    return [str(item) for item in data] if isinstance(data, list) else []
