"""Configs read from a run or sweep directory are untrusted: they may name only classes dlrun's configs name.

`hydra.utils.instantiate` calls whatever a `_target_` names, so a run directory received from someone
else could run `os.system` through `dlrun-eval` or `dlrun resume=`. The `_target_`s allowed are those
that dlrun's own config groups (the YAML files under `dlrun.CONF_DIR`) and the user's configured
search path define; overrides replayed from a run directory may not touch Hydra's own settings (its
logging config names classes too). `dlrun-eval --trust` (`dlrun-predict --trust`), or DLRUN_TRUST_RUN_CONFIGS=1 for any
command, accepts a directory's configs as they are.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from dlrun import CONF_DIR
from dlrun.errors import UserError

TRUST_ENV = "DLRUN_TRUST_RUN_CONFIGS"
_HINT = (f"If you trust this directory (you made it, or you read its configs), say so: dlrun-eval --trust ..., "
         f"dlrun-predict --trust ..., or {TRUST_ENV}=1 dlrun resume=<dir>.")


class UntrustedConfig(UserError):
    def __init__(self, message: str):
        super().__init__(message, _HINT, title="Untrusted config")


def trusted() -> bool:
    return os.environ.get(TRUST_ENV) == "1"


def targets_in(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(key, target) of every `_target_` in a plain or OmegaConf tree."""
    if hasattr(node, "items"):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                yield path, str(value)
            else:
                yield from targets_in(value, path)
    elif isinstance(node, (list, tuple)) or type(node).__name__ == "ListConfig":
        for i, value in enumerate(node):
            yield from targets_in(value, f"{where}[{i}]")


@functools.cache
def _targets_of_directory(directory: Path) -> frozenset[str]:
    found = set()
    for path in directory.rglob("*.yaml"):
        try:
            found |= {target for _, target in targets_in(yaml.safe_load(path.read_text()))}
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue  # an unreadable file defines nothing
    return frozenset(found)


def search_path_directories(entries: Iterable[str], untrusted: Path) -> list[Path]:
    """The directories of `hydra.searchpath` entries (file://DIR or pkg://package), minus any inside `untrusted`:
    a directory cannot vouch for itself."""
    directories = []
    for entry in entries:
        entry = str(entry).strip()
        if entry.startswith("pkg://"):
            import importlib.util

            spec = importlib.util.find_spec(entry[len("pkg://"):].replace("/", "."))
            locations = list(spec.submodule_search_locations or []) if spec else []
            directories += [Path(p) for p in locations]
        else:
            directories.append(Path(entry.removeprefix("file://")).expanduser())
    return [d.resolve() for d in directories if d.is_dir() and not _inside(d, untrusted)]


def _inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def allowed_targets(search_path: Iterable[str] = (), untrusted: Path = Path("/nonexistent")) -> frozenset[str]:
    allowed = set(_targets_of_directory(Path(CONF_DIR)))
    for directory in search_path_directories(search_path, untrusted):
        allowed |= _targets_of_directory(directory)
    return frozenset(allowed)


def recorded_search_path(directory: Path) -> list[str]:
    """The `hydra.searchpath` entries a run recorded in .hydra/hydra.yaml (the user's own config directories)."""
    try:
        hydra_yaml = yaml.safe_load((directory / ".hydra" / "hydra.yaml").read_text())
        entries = hydra_yaml["hydra"]["searchpath"]
    except (OSError, yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError):
        return []
    return [str(e) for e in entries] if isinstance(entries, list) else []


def check_config(cfg: Any, source: Path) -> None:
    """Refuse a config read from `source` that names a `_target_` no trusted config defines."""
    if trusted():
        return
    directory = source if source.is_dir() else source.parent
    if directory.name == ".hydra":
        directory = directory.parent
    allowed = allowed_targets(recorded_search_path(directory), directory)
    foreign = [(key, target) for key, target in targets_in(cfg) if target not in allowed]
    if foreign:
        named = ", ".join(f"{key} = {target}" for key, target in foreign[:3])
        raise UntrustedConfig(f"{source} names code that no dlrun config defines: {named}. "
                              "Building it would run that code, so dlrun refuses the directory.")


def check_overrides(overrides: Iterable[str], source: Path) -> None:
    """Refuse overrides replayed from a run directory that set Hydra's settings or a `_target_`.

    `hydra.searchpath` is the one Hydra setting a run records (the user's config directories); its
    directories must lie outside the run directory."""
    if trusted():
        return
    for override in overrides:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if key == "hydra.searchpath":
            entries = [e.strip(" '\"").removeprefix("file://") for e in value.strip("[]").split(",") if e.strip()]
            if not any(_inside(Path(e).expanduser(), source) for e in entries if not e.startswith("pkg://")):
                continue
        elif not key.startswith("hydra") and "_target_" not in override:
            continue
        raise UntrustedConfig(f"{source} replays the override {override!r}, which a run never records: "
                              "it could make dlrun run code.")
