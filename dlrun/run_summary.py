"""summary.json as named, typed fields: what one run (or one sweep job) ended with.

Every tool reads a run through this class (resume, `dlrun-eval`, `dlrun-summary`, the sweep launcher,
W&B), and only `RunDir.write_summary` writes it. The JSON keys are the field names, documented in the
README; a field that is None is left out of the file (not recorded), except `best_value` and
`best_epoch`, which are written as null once training has an `epochs` count (nothing was validated).
`metrics` and `overrides` are always written (empty: none).

Reading is tolerant: a summary.json written before `schema_version` existed (read as version 0), or by
an older or newer dlrun, still reads. A known key whose value has the wrong type reads as absent (and
is not written back); keys this version does not know are kept, in `extra`, and written back, so that
rewriting a summary (the launcher adds `sweep_job`) never loses what a newer dlrun recorded. Imports
no torch.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 1  # what this dlrun writes; a file without the key was written before versions (0)
STATUSES = ("running", "completed", "failed", "diverged", "interrupted", "pruned")  # pruned: a sweep's pruner stopped it
RESUMABLE = ("running", "failed", "interrupted")  # "running": the process was killed before it could say


@dataclass
class RunSummary:
    """One run's summary.json; the file's keys are schema_version, then these fields in this order.

    A new key is one more field, None by default (left out of the file until set).
    """

    status: str = "running"
    monitor: str | None = None  # callbacks.monitor, and whether lower or higher is better
    mode: str | None = None
    seed: int | None = None
    overrides: list[str] = field(default_factory=list)  # the command line's, without resume=
    choices: dict[str, str | None] | None = None  # config group -> option
    dlrun_version: str | None = None
    run_dir: str | None = None
    started_at: str | None = None  # ISO 8601, UTC; the first session's when resumed
    params: int | None = None
    data: str | None = None  # DataSpec.describe()
    data_notes: dict[str, Any] | None = None  # what loading found: a cache hit, skipped images, ...
    data_path: dict[str, Any] | None = None  # how batches were made: {mode: in memory | streamed, reason, bytes, budget}
    resumed: list[dict[str, Any]] | None = None  # one {at, epoch} per resumed session
    global_batch_size: int | None = None  # samples per optimizer step, over every device
    best_value: float | None = None  # the monitored metric's best value, and its epoch
    best_epoch: int | None = None
    epochs: int | None = None
    diverged: dict[str, Any] | None = None  # {step, epoch, loss, reason} of a diverged run
    pruned: dict[str, Any] | None = None  # {epoch, value} of a sweep job its sweeper's pruner stopped
    error: str | None = None  # a failed run's exception (or a sweep job's last output lines)
    startup_seconds: float | None = None  # process start to first training step
    global_step: int | None = None
    # the model it tests: the best epoch's train/val metrics and lr, beside test/* measured on best.ckpt
    # (in dlrun.metrics' order); the last epoch's number and metrics apart
    metrics: dict[str, float] = field(default_factory=dict)
    last_epoch: dict[str, Any] | None = None  # {epoch, metrics}
    sample_quality: dict[str, Any] | None = None  # a generative model's samples, judged (dlrun/sample_quality.py)
    wall_seconds: float | None = None
    finished_at: str | None = None
    checkpoints: dict[str, str] | None = None  # best, last -> path
    world_size: int | None = None
    device: str | None = None
    torch_version: str | None = None
    sweep_job: dict[str, Any] | None = None  # a sweep job's process: num, command, returncode, gpu, times
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they were
    schema_version: int = SCHEMA_VERSION  # the version read; what is written is always SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """The content of summary.json: schema_version, the recorded fields in order, then `extra`."""
        data: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None or (name in _NULL_WITH_EPOCHS and self.epochs is not None):
                data[name] = value
        return {**data, **{k: v for k, v in self.extra.items() if k not in data}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        """A summary from summary.json's content, whichever dlrun wrote it (see the module's docstring)."""
        known = {}
        for name in _FIELDS:
            value = data.get(name)
            if value is not None and _fits(value, _TYPES[name]):
                known[name] = value
        known["metrics"] = {k: float(v) for k, v in known.get("metrics", {}).items() if _is_number(v)}
        version = data.get("schema_version", 0)
        extra = {k: v for k, v in data.items() if k not in _FIELDS and k != "schema_version"}
        return cls(**known, extra=extra, schema_version=version if isinstance(version, int) else 0)


_NULL_WITH_EPOCHS = ("best_value", "best_epoch")
_TYPES = typing.get_type_hints(RunSummary)
_FIELDS = tuple(f.name for f in fields(RunSummary) if f.name not in ("extra", "schema_version"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the field's type: an int passes for a float, a list's members are checked,
    a mapping's are not (`from_json` keeps the numbers among `metrics`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args if a is not type(None))
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return _is_number(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return hint is Any or isinstance(value, hint)
