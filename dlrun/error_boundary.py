"""Which errors are the user's (one panel, exit code 2) and whether the user asked for tracebacks instead.

Shared by the CLI and the sweep launcher (which records a job whose config cannot be composed as
failed, with the same message the CLI would show). Imports no torch.
"""

from __future__ import annotations

import difflib
import os
import re
import sys

from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from dlrun import CONF_DIR
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
