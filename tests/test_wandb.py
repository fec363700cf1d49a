"""W&B logging, checked on real offline runs read back from their `.wandb` files with W&B's own record types.

No test needs a network or an account: credentials, W&B's settings and caches point into tmp_path, and
every run resolves to offline by itself (no WANDB_MODE is set).
"""

from __future__ import annotations

import csv
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import wandb
import yaml
from wandb.proto import wandb_internal_pb2 as pb

from dlrun.run_summary import RunSummary
from dlrun.tracking import EpochCSVLogger, WandbRunLogger, build_loggers, finalize_loggers, resolve_mode

# --- reading a .wandb file --------------------------------------------------------------------------
# A .wandb file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB
# blocks of chunks, each with a CRC-32, a length and a type (full, or first/middle/last of a record
# split across blocks). Each record is one serialized wandb_internal_pb2.Record.
_BLOCK, _CHUNK_HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[pb.Record]:
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER:  # a block's zero-filled trailer
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        chunk = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        if kind == 0:  # the zero-filled rest of the last block being written
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos} of {path}"
        pos += _CHUNK_HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


@dataclass
class WandbRun:
    """What one offline run recorded: its run record, config, history rows, summary and exit code."""

    path: Path
    run: pb.RunRecord = field(default_factory=pb.RunRecord)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None  # None: the run never finished
    artifacts: list[pb.ArtifactRecord] = field(default_factory=list)

    @classmethod
    def read(cls, wandb_file: Path) -> WandbRun:
        out = cls(wandb_file)
        for record in read_records(wandb_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out.run = record.run
                out.config.update({_key(u): json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "config":
                out.config.update({_key(u): json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                out.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                out.summary.update({_key(u): json.loads(u.value_json) for u in record.summary.update})
            elif kind == "exit":
                out.exit_code = record.exit.exit_code
            elif kind == "artifact":
                out.artifacts.append(record.artifact)
        out.config.pop("_wandb", None)
        return out


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def wandb_runs(directory: Path) -> list[WandbRun]:
    """Every W&B run recorded anywhere under `directory`, in the order of their files' names."""
    return [WandbRun.read(p) for p in sorted(directory.rglob("run-*.wandb"))]


# --- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No credentials, no W&B settings of the user's, W&B's caches in tmp_path; a fresh wandb singleton."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL",
                "WANDB_IDENTITY_TOKEN_FILE", "WANDB_RUN_ID", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_TAGS"):
        monkeypatch.delenv(var, raising=False)
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("NETRC", str(tmp_path / "wandb-home" / "netrc"))  # does not exist: not logged in
    monkeypatch.chdir(tmp_path)
    wandb.teardown()  # the settings singleton reads the environment once: read it again for this test
    yield
    wandb.teardown()


# --- end to end: a run, a sweep, DDP ----------------------------------------------------------------
@pytest.mark.slow
def test_offline_run_mirrors_the_run_directory(run_dlrun):
    result = run_dlrun(
        "debug=fast", "trainer.max_epochs=3", "seed=3", "logger=[csv,wandb]", "logger.wandb.project=proj",
        "logger.wandb.tags=[baseline,small]", "logger.wandb.job_type=train", "logger.wandb.log_model=true",
    )
    run_dir = result.run_dir
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))  # offline by itself, under the run directory
    assert f"wandb sync {offline}" in " ".join(result.stdout.split())
    [run] = wandb_runs(run_dir)
    summary = result.summary()

    assert run.run.project == "proj" and run.run.job_type == "train"
    assert list(run.run.tags) == ["baseline", "small"]
    assert run.run.display_name == "debug=fast,trainer.max_epochs=3,seed=3"  # the overrides, logger's left out
    assert run.run.run_group == ""  # not a sweep
    assert run.config == yaml.safe_load((run_dir / "config.yaml").read_text())  # the resolved config, plain

    # one history row per epoch, with metrics.csv's names and values
    rows = read_metrics_csv(run_dir / "metrics.csv")
    columns = list(rows[0])
    assert len(rows) == len(run.history) == 3
    for row, logged in zip(rows, run.history, strict=True):
        assert {k for k in logged if not k.startswith("_")} == set(columns)
        assert logged == pytest.approx({**logged, **row}, rel=1e-12)
        assert logged["_step"] == row["epoch"]
    assert "lr" in columns and "train/loss" in columns and "val/acc" in columns

    # the summary holds summary.json's scalars, the best monitored value and the test metrics
    assert summary["status"] == "completed" and run.exit_code == 0
    for key in ("best_value", "best_epoch", "epochs", "params", "run_dir", "monitor", "status"):
        assert run.summary[key] == summary[key], key
    assert run.summary["params"] > 0 and run.summary["run_dir"] == str(run_dir)
    assert run.summary["best_value"] == pytest.approx(min(r["val/loss"] for r in rows))
    for key in ("test/acc", "test/loss"):
        assert run.summary[key] == pytest.approx(summary["metrics"][key])
    # log_model: the best checkpoint is a model artifact, kept offline until `wandb sync`
    assert [a.type for a in run.artifacts] == ["model"]
    assert json.loads(run.artifacts[0].metadata)["original_filename"] == "best.ckpt"


CRASHING_NET = '''
import torch

class CrashingNet(torch.nn.Module):
    """A linear model that raises at its `crash_after`-th training batch (never, when negative)."""

    def __init__(self, spec, crash_after=-1, **_):
        super().__init__()
        self.linear = torch.nn.Linear(int(torch.tensor(spec.input_shape).prod()), spec.num_outputs)
        self.crash_after, self.batches = crash_after, 0

    def forward(self, x):
        if self.training:
            self.batches += 1
            if self.batches == self.crash_after:
                raise RuntimeError("the job crashed on purpose")
        return self.linear(x.flatten(1))
'''


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "dlrun"])
def test_sweep_jobs_are_runs_of_one_group_and_a_crashed_job_finishes_its_run(run_dlrun, tmp_path, launcher):
    """Job 0 crashes in its second epoch, job 1 completes: two finished runs, one group, nothing shared.

    `basic` runs both jobs in one process (a leak from job 0 into job 1 would show); `dlrun`, the
    default launcher, runs each job as its own process.
    """
    (tmp_path / "crashing_net.py").write_text(CRASHING_NET)
    result = run_dlrun(
        "-m", f"hydra/launcher={launcher}", "debug=fast", "trainer.max_epochs=2", "logger=[csv,wandb]",
        "model._target_=crashing_net.CrashingNet", "+model.crash_after=4,-1", check=False,
    )
    assert result.returncode != 0  # a job failed
    [sweep_dir] = list((tmp_path / "outputs" / "sweeps").iterdir())
    job_dirs = sorted(p.parent for p in sweep_dir.rglob("summary.json"))
    assert len(job_dirs) == 2, (result.stdout, result.stderr)
    crashed, completed = (wandb_runs(d) for d in job_dirs)
    assert len(crashed) == len(completed) == 1  # one W&B run per job, in its own directory
    crashed, completed = crashed[0], completed[0]

    assert crashed.run.run_id != completed.run.run_id
    assert crashed.run.run_group == completed.run.run_group == sweep_dir.name
    assert crashed.run.display_name.startswith("debug=fast,trainer.max_epochs=2,")
    assert "+model.crash_after=4" in crashed.run.display_name
    assert "+model.crash_after=-1" in completed.run.display_name

    assert crashed.exit_code == 1 and crashed.summary["status"] == "failed"
    assert "the job crashed on purpose" in crashed.summary["error"]
    assert [row["epoch"] for row in crashed.history] == [0]  # what it logged before the crash is kept
    assert completed.exit_code == 0 and completed.summary["status"] == "completed"
    assert [row["epoch"] for row in completed.history] == [0, 1]
    assert completed.config["model"]["crash_after"] == -1 and crashed.config["model"]["crash_after"] == 4
    if launcher == "dlrun":  # at the end of the sweep, its pictures go to one more run of the group
        [pictures] = wandb_runs(sweep_dir / "wandb")
        assert pictures.run.job_type == "sweep" and pictures.run.run_group == sweep_dir.name
        [row] = pictures.history
        for name in ("sweep_history", "sweep_plot", "sweep_curves"):  # W&B records an image as nested keys
            assert row[f"{name}._type"] == "image-file"
            assert (pictures.path.parent / "files" / row[f"{name}.path"]).read_bytes()[:4] == b"\x89PNG"
        assert pictures.summary["jobs/failed"] == pictures.summary["jobs/completed"] == 1
        assert pictures.exit_code == 0


@pytest.mark.slow
def test_under_ddp_only_rank_zero_talks_to_wandb(run_dlrun):
    result = run_dlrun("hardware=ddp_cpu", "debug=fast", "trainer.max_epochs=2", "logger=[csv,wandb]")
    runs = wandb_runs(result.output_dir.parent)  # anywhere: a rank > 0 that started W&B would show here
    assert len(runs) == 1, [str(r.path) for r in runs]
    assert runs[0].path.is_relative_to(result.run_dir)
    assert [row["epoch"] for row in runs[0].history] == [0, 1]
    assert runs[0].exit_code == 0 and runs[0].summary["world_size"] == 2


# --- in process: modes and failures -------------------------------------------------------------------
class TinyModel(pl.LightningModule):
    """Logs epoch metrics the way dlrun's Experiment does: train/loss and lr, then val/loss."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        return loss

    def on_train_epoch_end(self):
        self.log("lr", self.optimizers().param_groups[0]["lr"])

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x), y), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_tiny(loggers: list, epochs: int = 3) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    trainer = pl.Trainer(max_epochs=epochs, logger=loggers, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1,
                         log_every_n_steps=1)
    trainer.fit(TinyModel(), loader, loader)
    finalize_loggers(trainer.loggers, RunSummary(status="completed", epochs=epochs))
    wandb.teardown()  # finish() returns before W&B's service has written the file; teardown waits for it


def test_without_credentials_the_mode_is_offline_and_never_a_prompt(monkeypatch, tmp_path):
    assert resolve_mode(None) == "offline"
    assert resolve_mode("offline") == "offline"
    with pytest.warns(RuntimeWarning, match="no credentials"):
        assert resolve_mode("online") == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # W&B's old name for offline
    assert resolve_mode(None) == "offline"
    assert resolve_mode("disabled") == "disabled"


def test_logged_in_means_online(monkeypatch, tmp_path):
    host = wandb.setup().settings.base_url.split("://")[1].split("/")[0]
    (tmp_path / "wandb-home").mkdir(exist_ok=True)
    (tmp_path / "wandb-home" / "netrc").write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
    assert resolve_mode(None) == "online"  # as `wandb login` leaves it
    assert resolve_mode("offline") == "offline"  # the config wins
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode(None) == "offline"  # and so does the environment


def test_an_api_key_means_online_and_a_failed_start_falls_back_to_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "not-a-valid-key")  # refused by wandb.init before any network
    wandb.teardown()
    assert resolve_mode(None) == "online"
    csv_logger, wandb_logger = EpochCSVLogger(tmp_path), WandbRunLogger(tmp_path, project="p")
    with pytest.warns(RuntimeWarning, match="could not start online"):
        fit_tiny([csv_logger, wandb_logger])
    [run] = wandb_runs(tmp_path / "wandb")
    assert run.exit_code == 0 and [row["epoch"] for row in run.history] == [0, 1, 2]
    assert set(run.history[0]) >= {"train/loss", "val/loss", "lr", "epoch"}


def test_wandb_that_cannot_start_never_stops_training(tmp_path):
    bad = WandbRunLogger(tmp_path, tags=["x" * 65])  # W&B refuses tags over 64 characters
    with pytest.warns(RuntimeWarning, match="W&B failed") as warned:
        fit_tiny([EpochCSVLogger(tmp_path), bad])
    assert len([w for w in warned if "W&B" in str(w.message)]) == 1  # warned once, not once per epoch
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 3  # the other logger got every epoch
    assert wandb_runs(tmp_path) == [] and wandb.run is None


@pytest.mark.parametrize("how", ["config", "environment"])
def test_disabled_writes_nothing(compose_cfg, tmp_path, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_cfg("logger=[csv,wandb]", *(["logger.wandb.mode=disabled"] if how == "config" else []))
    loggers = build_loggers(cfg.logger, tmp_path)
    assert [type(lg) for lg in loggers] == [EpochCSVLogger]
    fit_tiny(loggers, epochs=1)
    assert (tmp_path / "metrics.csv").is_file()
    assert not (tmp_path / "wandb").exists() and not list(tmp_path.rglob("*.wandb")) and wandb.run is None


def test_tensorboard_gets_the_epoch_metrics(compose_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = build_loggers(compose_cfg("logger=[csv,tensorboard]").logger, tmp_path)
    fit_tiny(loggers, epochs=2)
    [events] = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    board = EventAccumulator(str(events.parent))
    board.Reload()
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    epoch_at_step = {e.step: int(e.value) for e in board.Scalars("epoch")}
    for key in ("train/loss", "val/loss", "lr"):
        logged = {epoch_at_step[e.step]: e.value for e in board.Scalars(key)}
        assert logged == pytest.approx({int(row["epoch"]): row[key] for row in rows}, rel=1e-6), key


def test_wandb_knobs_are_validated(compose_cfg):
    from dlrun.config import find_problems

    problems = find_problems(compose_cfg("logger=wandb", "logger.wandb.mode=sometimes", "logger.wandb.log_model=3"))
    assert any(p.startswith("logger.wandb.mode = 'sometimes': expected one of online, offline, disabled")
               for p in problems), problems
    assert any(p.startswith("logger.wandb.log_model = 3: expected true or false") for p in problems), problems
    assert find_problems(compose_cfg("logger=[csv,wandb,tensorboard]")) == []
