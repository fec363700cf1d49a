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
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)

STATUSES = ("running", "completed", "failed", "diverged", "interrupted", "pruned")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old content or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes files private; results are meant to be shared
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """Paths and writers for one run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, which: str) -> Path:
        return self.checkpoint_dir / f"{which}.ckpt"

    def write_summary(self, summary: dict[str, Any]) -> None:
        if summary.get("status") not in STATUSES:
            raise ValueError(f"unknown run status {summary.get('status')!r}")
        write_atomic(self.summary_file, json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n")

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary_file.read_text())

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.path / name, text)
