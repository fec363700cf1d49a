"""The run directory contract: what every run (and every job of a sweep) leaves behind.

    <run dir>/
      config.yaml        the resolved config
      overrides.yaml     the command-line overrides
      metrics.csv        one row per epoch (logger=csv)
      summary.json       status, best monitored value and epoch, final metrics, timing, sizes, seed
      checkpoints/       best.ckpt, last.ckpt
      dlrun.log          everything logged, including Lightning's messages
      .hydra/            Hydra's own record of the composition

Other tools (sweep summary, W&B, resume, dlrun-eval) read these files, never the logs. Every file is
written atomically (temporary file + rename), so a killed process never leaves one half written.
This module imports no torch (the CLI checks a run directory before loading it); `load_checkpoint`
imports it when called.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dlrun.errors import UserError
from dlrun.run_summary import STATUSES, RunSummary
from dlrun.trust import check_config

_UMASK = os.umask(0)
os.umask(_UMASK)

# The top-level sections of every run's config.yaml, which rebuilding the run reads.
RUN_SECTIONS = ("seed", "dataset", "model", "optim", "scheduler", "regularizer", "trainer", "hardware", "callbacks",
                "logger")


class RunInterrupted(BaseException):
    """A run stopped on a signal (Ctrl-C, SIGTERM, SLURM's SIGUSR1) after saving what it had.

    The CLI exits with 128 + the signal number, the shell's convention for "killed by a signal".
    A BaseException, like KeyboardInterrupt: not an error of the job, and a sweep stops on it.
    """

    def __init__(self, signum: int, run_dir: Path | None = None):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
        self.run_dir = run_dir

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write `text` to `path` so that readers see the old content or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes files private; results are meant to be shared
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_summary_file(path: Path) -> RunSummary | None:
    """A summary.json, or None where it is missing or unreadable (a run killed before writing it)."""
    try:
        summary = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return RunSummary.from_json(summary) if isinstance(summary, dict) else None


class RunDir:
    """Paths and writers for one run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, which: str) -> Path:
        return self.checkpoint_dir / f"{which}.ckpt"

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def preprocessing_file(self) -> Path:
        """The data set's fitted preprocessing (dataset=csv), as plain JSON: dlrun-eval applies it as saved."""
        return self.path / "preprocessing.json"

    @classmethod
    def existing(cls, path: str | os.PathLike) -> RunDir:
        """An existing run directory, or a UserError that says what `path` is instead."""
        where = Path(path).expanduser()
        if not where.exists():
            raise UserError(f"{where} does not exist.", "Pass a run directory: outputs/runs/<date>/<time>.",
                            title="Not a run directory")
        if not where.is_dir() or not ((where / "config.yaml").is_file() or (where / ".hydra" / "config.yaml").is_file()):
            raise UserError(f"{where} is not a dlrun run directory (it has no config.yaml).",
                            "Pass a run directory: outputs/runs/<date>/<time>.", title="Not a run directory")
        return cls(where)

    def read_config(self, complete: bool = False) -> DictConfig:
        """The run's resolved config (`config.yaml`; Hydra's `.hydra/config.yaml` if dlrun died before writing it).

        `complete`: the config is about to be built, so it must hold every section a run has."""
        path = self.config_file if self.config_file.is_file() else self.path / ".hydra" / "config.yaml"
        try:
            cfg = OmegaConf.load(path)
        except Exception as err:  # unreadable, binary, not YAML
            raise UserError(f"{path} cannot be read as a config: {type(err).__name__}: {err}".strip(),
                            "The run directory is damaged; start a new run.", title="Unreadable run directory") from err
        if not isinstance(cfg, DictConfig) or "model" not in cfg or "dataset" not in cfg:
            raise UserError(f"{path} is not a dlrun config (no model or dataset).",
                            "The run directory is damaged; start a new run.", title="Unreadable run directory")
        check_config(cfg, path)  # its _target_s are built: only those dlrun's configs define
        missing = [key for key in RUN_SECTIONS if key not in cfg] if complete else []
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}: not the complete config of a run.",
                            "The run directory is damaged; start a new run.", title="Unreadable run directory")
        return cfg

    def read_preprocessing(self) -> dict[str, Any] | None:
        """preprocessing.json (None for data sets without one); the data module checks its content."""
        if not self.preprocessing_file.is_file():
            return None
        try:
            fitted = json.loads(self.preprocessing_file.read_text())
        except (OSError, ValueError) as err:
            fitted = err
        if not isinstance(fitted, dict):
            raise UserError(f"{self.preprocessing_file} cannot be read as the run's preprocessing: {fitted}.",
                            "The run directory is damaged; train the run again.", title="Unreadable run directory")
        return fitted

    def read_summary_if_any(self) -> RunSummary | None:
        """summary.json, or None where the run was killed before writing one (or left it unreadable)."""
        return read_summary_file(self.summary_file)

    def write_summary(self, summary: RunSummary) -> None:
        """The one writer of summary.json (the run, and the sweep launcher for a job that could not)."""
        if summary.status not in STATUSES:
            raise ValueError(f"unknown run status {summary.status!r}")
        write_atomic(self.summary_file, json.dumps(summary.to_json(), indent=2, default=str) + "\n")

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.path / name, text)


_CHECKPOINT_HINT = "Pass a checkpoint that dlrun wrote: <run dir>/checkpoints/best.ckpt or last.ckpt."


def _unusable(path: Path, reason: str) -> UserError:
    return UserError(f"{path} cannot be loaded: {reason}.", _CHECKPOINT_HINT, title="Unusable checkpoint")


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Refuse a missing, empty, truncated or non-PyTorch file without importing torch (the CLI fails fast)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a file.", _CHECKPOINT_HINT, title="Unusable checkpoint")
    with path.open("rb") as handle:
        head = handle.read(4)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose directory is at the end
        if not head:
            raise _unusable(path, "it is empty")
        if head == b"PK\x03\x04":
            raise _unusable(path, "it is truncated (the zip archive that torch.save writes has no end)")
        raise _unusable(path, "it is not a PyTorch checkpoint (not the zip archive that torch.save writes)")


def load_checkpoint(path: str | os.PathLike, expected: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a Lightning checkpoint safely (`weights_only`: tensors and plain containers, no code).

    A missing, empty, truncated, foreign or code-carrying file becomes a UserError that says which;
    so does one whose weights do not fit `expected` (the state_dict of the model it is meant for).
    """
    import torch

    path = Path(path)
    check_checkpoint_file(path)

    def refuse(reason: str) -> UserError:
        return _unusable(path, reason)

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise refuse("it holds Python objects other than tensors (refused: loading them could run code)") from err
        raise refuse(f"it is damaged ({str(err).splitlines()[0]})") from err
    except Exception as err:  # a damaged archive member
        raise refuse(f"it is damaged ({(str(err) or type(err).__name__).splitlines()[0]})") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"{path} is a PyTorch file but not a Lightning checkpoint (no state_dict).",
                        _CHECKPOINT_HINT, title="Unusable checkpoint")
    if expected is not None:
        _check_weights(path, checkpoint["state_dict"], expected)
    return checkpoint


def _check_weights(path: Path, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [
        f"{k}: {tuple(found[k].shape)} in the checkpoint, {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in found and hasattr(found[k], "shape") and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or extra or shapes):
        return
    lines = [f"{path} holds weights of another model:"]
    if missing:
        lines.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    if extra:
        lines.append(f"{len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}")
    lines += shapes[:3]
    raise UserError("\n".join(lines), "Use the checkpoint of this run directory, with the config it was trained with.",
                    title="Checkpoint does not fit the model")


def check_output_root_writable(args: list[str]) -> None:
    """Stop with a panel, before Hydra creates a run directory, when the output root (`paths.output_dir`:
    the command line's, else $DLRUN_OUTPUT_DIR, else ./outputs) cannot be written, e.g. a container's
    mounted /outputs that belongs to another uid; Hydra would end in a PermissionError traceback."""
    given = [arg.split("=", 1)[1] for arg in args if arg.startswith("paths.output_dir=")]
    root = Path(given[-1] if given else os.environ.get("DLRUN_OUTPUT_DIR", "outputs")).absolute()
    setting = ("paths.output_dir" if given else "$DLRUN_OUTPUT_DIR" if "DLRUN_OUTPUT_DIR" in os.environ
               else "the default, ./outputs")
    hint = "Point DLRUN_OUTPUT_DIR (or paths.output_dir=<dir>) at a directory this user can write."
    existing = next(p for p in (root, *root.parents) if p.exists())  # what mkdir -p would write into
    if not existing.is_dir():
        raise UserError(f"Cannot write the output directory {root} ({setting}): {existing} is not a directory.",
                        hint, title="Output directory not writable")
    if os.access(existing, os.W_OK | os.X_OK):
        return
    stat = existing.stat()
    owner = (f"belongs to uid {stat.st_uid} (mode {stat.st_mode & 0o777:o}) and dlrun runs as uid {os.getuid()}"
             if stat.st_uid != os.getuid() else "is not writable (a read-only file system, or its mode)")
    raise UserError(
        f"Cannot write the output directory {root} ({setting}): {existing} {owner}.",
        hint + " In Docker, run as its owner: docker run --user \"$(id -u):$(id -g)\" -v \"$PWD/outputs:/outputs\" ...",
        title="Output directory not writable",
    )
