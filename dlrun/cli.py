"""Entry points. Hydra composes the config; dlrun validates it before any heavy import, then runs it."""

from __future__ import annotations

import os
import re
import sys

import hydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from dlrun.config import validate
from dlrun.console import print_user_error
from dlrun.errors import UserError

# The user asked for full tracebacks (Hydra's own switch); read once, before dlrun sets it for itself.
SHOW_TRACEBACK = os.environ.get("HYDRA_FULL_ERROR") == "1"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _run(cfg: DictConfig) -> float | None:
    validate(cfg)
    from dlrun.run import run_experiment  # torch and Lightning load only for a valid config

    return run_experiment(cfg)


def main() -> None:
    """`dlrun`: run (or with -m, sweep) an experiment. Config errors exit with code 2 and one panel."""
    # Make Hydra raise instead of printing and exiting 1, so that dlrun can render the error itself.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _run()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:
        user_error = as_user_error(err)
        if user_error is None or SHOW_TRACEBACK:
            raise
        print_user_error(user_error)
        sys.exit(2)


def as_user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, or a UserError made from a Hydra composition error; None for bugs."""
    seen = err
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, MissingConfigException):
        return UserError(_strip_search_path(str(err)), "Pick one of the options listed above.",
                         title="Unknown option")
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
