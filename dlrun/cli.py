"""Entry points. Hydra composes the config; dlrun validates it before any heavy import, then runs it."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys

import hydra
from hydra._internal.hydra import Hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from dlrun import CONF_DIR
from dlrun.command_line import expand_resume
from dlrun.config import validate
from dlrun.console import err_console
from dlrun.error_boundary import (  # before main() sets HYDRA_FULL_ERROR
    SHOW_TRACEBACK,
    as_user_error,
    exit_for,
)
from dlrun.lab.runner import is_lab_command
from dlrun.lab.runner import main as run_lab
from dlrun.rundir import RunDir, RunInterrupted, check_output_root_writable
from dlrun.sweep.space import check_search_space
from dlrun.sweep.summary import end_of_sweeps


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
    validate(cfg, HydraConfig.get())  # Hydra's choices say which option file declares each group's knobs
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
    if is_lab_command(sys.argv[1:]):  # `dlrun lab=...` runs a sweep of its own (dlrun/lab/)
        try:
            sys.exit(run_lab(sys.argv[1:]))
        except Exception as err:
            exit_for(err, as_user_error(err))
    try:
        sys.argv[1:] = expand_resume(sys.argv[1:])
        check_output_root_writable(sys.argv[1:])
        if {"-m", "--multirun"} & set(sys.argv[1:]):
            check_search_space(sys.argv[1:])
        with contextlib.redirect_stderr(_WithoutHydraJobErrorLine(sys.stderr)):
            _run()
    except KeyboardInterrupt:
        if end_of_sweeps() is not None:  # what the finished jobs of an interrupted sweep found
            _how_to_resume_the_sweep("Ctrl-C")
        sys.exit(130)
    except RunInterrupted as err:  # the run (a sweep: each running job) saved its last checkpoint first
        if end_of_sweeps() is not None:
            _how_to_resume_the_sweep(f"signal {err.signum}")
        else:
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


def _how_to_resume_the_sweep(why: str) -> None:
    from rich.markup import escape

    from dlrun.sweep.launcher import launched_sweeps

    arguments = [a for a in sys.argv[1:] if not a.startswith("sweep.resume=")]
    command = shlex.join(["dlrun", *arguments, f"sweep.resume={launched_sweeps[-1]}"])
    err_console.print(f"[bold yellow]interrupted[/bold yellow] ({why}): running jobs stopped at their last "
                      "checkpoint. Continue the sweep (those jobs go on, finished ones are kept) with:\n  "
                      + escape(command), highlight=False)


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


def _resumed_config(cfg: DictConfig) -> DictConfig:
    """The resumed run's saved resolved config, with `resume` set."""
    saved = RunDir.existing(cfg.resume).read_config(complete=True)
    with open_dict(saved):
        saved.resume = cfg.resume
    return saved


if __name__ == "__main__":
    main()
