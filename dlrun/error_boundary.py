"""The one error boundary of every command (`dlrun`, `dlrun -m`, `resume=`, `dlrun-eval`, `dlrun-summary`,
and a sweep's jobs, which are `dlrun` processes): which errors are the user's, and how a command ends.

- A user error (dlrun.errors.UserError, or a Hydra composition error made into one by `as_user_error`) or
  a failure of the environment (a path of the wrong kind, no permission, a full disk, no memory): exit 2
  and one panel naming the path and what to do.
- Anything else is a bug: exit 1 and one line on the screen; the traceback goes to the run's log file
  (dlrun.log), or on the screen with HYDRA_FULL_ERROR=1; a run directory's summary.json says `failed`.

Shared by the CLI and the sweep launcher (which records a job whose config cannot be composed as
failed, with the same message the CLI would show). Imports no torch.
"""

from __future__ import annotations

import difflib
import errno
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from dlrun import CONF_DIR
from dlrun.console import err_console, print_user_error
from dlrun.errors import UserError

# The user asked for full tracebacks (Hydra's own switch). Read once, when this module is first imported:
# dlrun.cli imports it before it sets HYDRA_FULL_ERROR for itself (to make Hydra raise).
SHOW_TRACEBACK = os.environ.get("HYDRA_FULL_ERROR") == "1"


def traceback_env() -> dict[str, str]:
    """The user's own HYDRA_FULL_ERROR, for a process that dlrun starts (a sweep's job)."""
    return {"HYDRA_FULL_ERROR": "1" if SHOW_TRACEBACK else "0"}


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


# --- how a command ends ------------------------------------------------------------------------------
_OUTPUT_HINT = "If it is where results go, point DLRUN_OUTPUT_DIR (paths.output_dir) at a writable directory."
_PATH_ERRORS = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("the disk is full", "Free some space, or write elsewhere. " + _OUTPUT_HINT),
    errno.EDQUOT: ("the disk quota is exceeded", "Free some space, or write elsewhere. " + _OUTPUT_HINT),
    errno.EACCES: ("permission denied", "Use a path you may read and write. " + _OUTPUT_HINT),
    errno.EPERM: ("operation not permitted", "Use a path you may read and write. " + _OUTPUT_HINT),
    errno.EROFS: ("the file system is read-only", "Use a writable location. " + _OUTPUT_HINT),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "Use a directory path. " + _OUTPUT_HINT),
    errno.EISDIR: ("it is a directory, where a file is wanted", "Give the path of a regular file."),
    errno.EEXIST: ("something else already exists there", "Remove it, or use another path."),
    errno.ENOENT: ("it cannot be created or found there", "Check the path; its parent must exist and be writable. "
                   + _OUTPUT_HINT),
    errno.ENXIO: ("it is a device or a pipe, not a file", "Give the path of a regular file."),
}
_MEMORY_HINT = "Lower model.width / model.depth or dataset.batch_size, or use a machine with more memory."


def environment_error(err: BaseException) -> UserError | None:
    """A UserError for a failure of the machine rather than of dlrun (a path, permissions, disk, memory)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _PATH_ERRORS:
            what, hint = _PATH_ERRORS[seen.errno]
            where = seen.filename if seen.filename is not None else "a file"
            return UserError(f"{where}: {what} ({seen.strerror}).", hint, title="Cannot use this path")
        if isinstance(seen, MemoryError) or type(seen).__name__ == "OutOfMemoryError":  # torch's, CUDA's
            first = (str(seen).strip().splitlines() or [type(seen).__name__])[0]
            return UserError(f"Out of memory: {first}", _MEMORY_HINT, title="Out of memory")
        seen = seen.__cause__ or seen.__context__
    return None


def exit_for(err: BaseException, user_error: UserError | None = None) -> NoReturn:
    """End the command for `err`: exit 2 with a panel for a user or environment error, 1 for a bug."""
    user_error = user_error or environment_error(err)
    if SHOW_TRACEBACK:
        raise err
    if user_error is not None:
        print_user_error(user_error)
        sys.exit(2)
    log_file = _log_file()
    summary = _mark_run_failed(log_file.parent if log_file else None, err)
    text = "".join(traceback.format_exception(err))
    logging.getLogger("dlrun").error("bug: %s", text.rstrip())
    if log_file is None:  # no run directory (dlrun-eval, dlrun-summary): a file of its own
        log_file = _write_crash_log(text)
    line = (str(err).strip().splitlines() or [""])[0]
    err_console.print(f"[bold red]error[/bold red] {type(err).__name__}: {line} · a bug in dlrun: the traceback is in "
                      f"{log_file}{' (status failed in ' + str(summary) + ')' if summary else ''}; "
                      "HYDRA_FULL_ERROR=1 shows it here", highlight=False, markup=True, soft_wrap=True)
    sys.exit(1)


@contextmanager
def boundary() -> Iterator[None]:
    """Around a command's main (dlrun-eval, dlrun-summary; dlrun's own main calls exit_for itself)."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:
        exit_for(err, as_user_error(err))


def _log_file() -> Path | None:
    """The run's dlrun.log (Hydra's job logging sends the root logger there), if this process has one."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return None


def _mark_run_failed(run_dir: Path | None, err: BaseException) -> Path | None:
    """status: failed in the run's summary.json, unless the run wrote its own ending already."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    from dlrun.run_summary import RunSummary
    from dlrun.rundir import RunDir, read_summary_file

    summary = read_summary_file(run_dir / "summary.json") or RunSummary()
    if summary.status == "running":
        summary.status, summary.error = "failed", f"{type(err).__name__}: {err}"
        try:
            RunDir(run_dir).write_summary(summary)
        except OSError:
            return None
    return run_dir / "summary.json"


def _write_crash_log(text: str) -> Path:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="dlrun-crash-", suffix=".log")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return Path(path)
