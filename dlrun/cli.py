"""Entry points. Hydra composes the config; dlrun validates it before any heavy import, then runs it."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
from pathlib import Path

import hydra
import yaml
from hydra._internal.hydra import Hydra
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from dlrun import CONF_DIR
from dlrun.boundary import SHOW_TRACEBACK, exit_for
from dlrun.config import validate
from dlrun.console import err_console
from dlrun.errors import UserError
from dlrun.rundir import RESUMABLE, RunDir, RunInterrupted, check_checkpoint_file
from dlrun.sweep.space import check_search_space
from dlrun.sweep.summary import end_of_sweeps
from dlrun.trust import check_overrides


def mode_from_command_line(hydra_app: Hydra, config_name: str | None, overrides: list[str]) -> RunMode | None:
    """Hydra.get_mode, without composing the whole config. Hydra 1.3 composes it once only to read
    `hydra.mode`, then again to run: a third of every command's start-up, config errors included.
    dlrun's configs never set hydra.mode, so only the command line can (-m, or hydra.mode=...)."""
    for override in reversed(overrides):
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "hydra.mode" and value in RunMode.__members__:
            return RunMode[value]
    return None


Hydra.get_mode = mode_from_command_line


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _run(cfg: DictConfig) -> float | None:
    if cfg.get("resume"):
        cfg = _resumed_config(cfg)
    validate(cfg)
    from dlrun.run import run_experiment  # torch and Lightning load only for a valid config

    return run_experiment(cfg)


def main() -> None:
    """`dlrun`: run (or with -m, sweep) an experiment. Config errors exit with code 2 and one panel."""
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        from dlrun.docs import print_help

        print_help()
        return
    # Make Hydra raise instead of printing and exiting 1, so that dlrun can render the error itself.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        sys.argv[1:] = expand_resume(sys.argv[1:])
        if {"-m", "--multirun"} & set(sys.argv[1:]):
            check_search_space(sys.argv[1:])
        with contextlib.redirect_stderr(_WithoutHydraJobErrorLine(sys.stderr)):
            _run()
    except KeyboardInterrupt:
        end_of_sweeps()  # what the finished jobs of an interrupted sweep found
        sys.exit(130)
    except RunInterrupted as err:  # the run saved its last checkpoint and summary.json first
        end_of_sweeps()
        where = err.run_dir or "<run dir>"
        err_console.print(f"[bold yellow]interrupted[/bold yellow] (signal {err.signum}): the last checkpoint "
                          f"holds every finished epoch. Continue with:\n  dlrun resume={where}")
        sys.exit(err.exit_code)
    except Exception as err:
        # A sweeper may give up on failed jobs (the basic one raises the first job's error): the
        # sweep's report shows every job's error, and the exit code says that some failed.
        if end_of_sweeps() and not SHOW_TRACEBACK:
            sys.exit(1)
        exit_for(err, as_user_error(err))  # a panel and 2, or for a bug one line and 1 (traceback: dlrun.log)
    if end_of_sweeps():
        sys.exit(1)


class _WithoutHydraJobErrorLine:
    """stderr minus the line Hydra writes before re-raising a job's error ("Error executing job with
    overrides: [...]"): dlrun shows the error itself, as a panel or, when asked, as a traceback."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        if text.startswith("Error executing job with overrides:"):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def expand_resume(args: list[str]) -> list[str]:
    """`resume=<run dir>` -> the run's own overrides, resume=<run dir>, and its directory as Hydra's run dir.

    Composing the original overrides again gives Hydra the run's group choices (data set and model
    names); `_run` then swaps in the run's saved resolved config, so the continued run is the same
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
    status = (summary or {}).get("status", "running")
    if status not in RESUMABLE:
        raise UserError(f"{run_dir.path} has status '{status}': there is nothing to resume.",
                        "dlrun-eval <run dir> evaluates it; a new run (another seed, a smaller optim.lr) tries again.",
                        title="Cannot resume")
    overrides = _read_list(run_dir.path / ".hydra" / "overrides.yaml") or _read_list(run_dir.path / "overrides.yaml")
    hydra_yaml = _read_yaml(run_dir.path / ".hydra" / "hydra.yaml")
    hydra_overrides = hydra_yaml.get("hydra", {}).get("overrides", {}).get("hydra", []) if isinstance(hydra_yaml, dict) else []
    search_path = [o for o in hydra_overrides or [] if str(o).startswith("hydra.searchpath")]  # the user's own configs
    check_overrides([*search_path, *overrides], run_dir.path)  # replayed from the directory: untrusted
    quoted = "'" + str(run_dir.path).replace("'", "\\'") + "'"
    return [*others, *search_path, *overrides, f"resume={quoted}", f"hydra.run.dir={quoted}", "hydra.output_subdir=null"]


def _resumed_config(cfg: DictConfig) -> DictConfig:
    """The resumed run's saved resolved config, with `resume` set."""
    saved = RunDir.existing(cfg.resume).read_config(complete=True)
    with open_dict(saved):
        saved.resume = cfg.resume
    return saved


def _read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None


def _read_list(path: Path) -> list[str]:
    data = _read_yaml(path)
    return [str(item) for item in data] if isinstance(data, list) else []


def as_user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, or a UserError made from a Hydra composition error; None for bugs."""
    seen = err
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, MissingConfigException):
        return UserError(_strip_search_path(str(err)) + _list_options(err), "Pick one of the options listed above.",
                         title="Unknown option")
    unknown = _unknown_key(err)
    if unknown is not None:
        return unknown
    if isinstance(err, OverrideParseException):
        return UserError(str(err), "Overrides look like key=value, group=option or 'group=[a,b]'.",
                         title="Cannot parse the command line")
    if isinstance(err, HydraException) and "Error locating target" in str(err):
        return UserError(str(err).splitlines()[0], "Check the _target_ of that config: module.Class.",
                         title="Unknown class")
    if isinstance(err, (HydraException, OmegaConfBaseException)) and not _inside_dlrun_code(err):
        return UserError(_strip_search_path(_describe_omegaconf(err)),
                         "`dlrun --help` lists the groups and their options; `dlrun --cfg job` the keys.")
    return None


def _list_options(err: MissingConfigException) -> str:
    """Hydra lists a group's options for `group=typo`, not for a typo inside a list ('regularizer=[l2,typo]')."""
    if err.options or not err.missing_cfg_file or "/" not in err.missing_cfg_file:
        return ""
    group, option = err.missing_cfg_file.rsplit("/", 1)
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    if not options:
        return ""
    close = difflib.get_close_matches(option, options, n=1)
    return (f"\n\nAvailable options in '{group}': {', '.join(options)}"
            + (f"\nDid you mean '{close[0]}'?" if close else ""))


def _unknown_key(err: BaseException) -> UserError | None:
    """`model.widht=3`: name the node, list its keys, and suggest the closest one."""
    if not (isinstance(err, ConfigCompositionException) and "Could not override" in str(err)):
        return None
    cause = err.__cause__
    node, key, full_key = getattr(cause, "parent_node", None), getattr(cause, "key", None), getattr(cause, "full_key", "")
    if not isinstance(node, DictConfig) or key is None:
        return None
    valid = [str(k) for k in node if not (str(k).startswith("_") and str(k).endswith("_")) and k != "hydra"]
    where = str(full_key).rsplit(".", 1)[0] if "." in str(full_key) else ""
    close = difflib.get_close_matches(str(key), valid, n=1)
    message = f"{where or 'The config'} has no key '{key}'." + (f" Did you mean '{close[0]}'?" if close else "")
    message += f"\nValid keys{' of ' + where if where else ''}: {', '.join(valid)}"
    given = next((o for o in sys.argv[1:] if o.split("=", 1)[0] == full_key), f"{full_key}=...")
    return UserError(message, f"To add a key on purpose, prefix it with +: +{given}", title="Unknown key")


def _inside_dlrun_code(err: BaseException) -> bool:
    """True when the error was raised while running an experiment (a bug), not while composing."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("dlrun", "run.py")):
            return True
        tb = tb.tb_next
    return False


def _describe_omegaconf(err: BaseException) -> str:
    text = str(err)
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause) not in text:
        text += "\n" + str(cause)
    return text


def _strip_search_path(text: str) -> str:
    """Hydra appends its config search path to some errors: noise for a user who mistyped an option."""
    text = re.split(r"\n\s*Config search path:", text)[0]
    return re.sub(r"\n\s*object_type=dict", "", text).strip()


if __name__ == "__main__":
    main()
