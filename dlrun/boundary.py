"""The one error boundary of every command (`dlrun`, `dlrun -m`, `resume=`, `dlrun-eval`, `dlrun-summary`,
and the sweep's jobs, which are `dlrun` processes).

- A user error (dlrun.errors.UserError) or a failure of the environment (a path of the wrong kind, no
  permission, a full disk, no memory): exit 2 and one panel naming the path and what to do.
- Anything else is a bug: exit 1 and one line on the screen; the traceback goes to the run's log file
  (dlrun.log), or on the screen with HYDRA_FULL_ERROR=1; a run directory's summary.json says `failed`.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from dlrun.console import err_console, print_user_error
from dlrun.errors import UserError

# The user asked for full tracebacks (Hydra's own switch); read once, before dlrun sets it for itself.
SHOW_TRACEBACK = os.environ.get("HYDRA_FULL_ERROR") == "1"

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
def error_boundary(as_user_error: Callable[[BaseException], UserError | None] = lambda err: None) -> Iterator[None]:
    """Around a command's main: `as_user_error` may turn a library's error into a UserError."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:
        exit_for(err, _user_error_in(err) or as_user_error(err))


def _user_error_in(err: BaseException) -> UserError | None:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


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
    from dlrun.rundir import RunDir, read_summary_file

    summary = read_summary_file(run_dir / "summary.json") or {"status": "running"}
    if summary.get("status") == "running":
        summary.update(status="failed", error=f"{type(err).__name__}: {err}")
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
