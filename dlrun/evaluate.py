"""`dlrun-eval <run dir or checkpoint>`: the metrics of a trained model on one split of its data set.

    dlrun-eval outputs/runs/2026-11-22/02-08-25_867686              # best.ckpt on the test split
    dlrun-eval outputs/runs/.../checkpoints/last.ckpt --split val

The run's saved resolved config rebuilds its data (same seed, so the same split and normalization)
and its network with `dlrun.run.build_experiment`, the function the run itself used, so the weights
fit. The checkpoint is read with `weights_only` (tensors and plain containers, no code). The metrics
are printed and written to `<run dir>/eval_<split>.json`, atomically. Bad input (not a run
directory, an unusable checkpoint) exits with code 2 and one panel, like `dlrun`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.table import Table

from dlrun import __version__
from dlrun.config import validate
from dlrun.console import console, format_value, print_user_error
from dlrun.errors import UserError
from dlrun.rundir import RunDir, check_checkpoint_file, load_checkpoint, write_atomic

SPLITS = ("test", "val", "train")


def resolve(target: str | Path, which: str = "best") -> tuple[RunDir, Path]:
    """(run directory, checkpoint) for a run directory or for a checkpoint file inside one."""
    path = Path(target).expanduser()
    if path.is_file():
        root = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        if not (root / "config.yaml").is_file():
            raise UserError(f"{path} is not inside a dlrun run directory (no config.yaml beside checkpoints/).",
                            "dlrun-eval needs the run's config to rebuild the data and the network.",
                            title="Not a run directory")
        return RunDir(root), path
    run_dir = RunDir.existing(path)
    for name in (which, "last"):
        if run_dir.checkpoint(name).is_file():
            return run_dir, run_dir.checkpoint(name)
    raise UserError(f"{run_dir.path} has no checkpoint ({run_dir.checkpoint_dir} holds no {which}.ckpt).",
                    "The run stopped before its first validation; there is nothing to evaluate.",
                    title="No checkpoint")


def _choices(run_dir: RunDir) -> dict[str, Any]:
    """The run's group choices (data set and model names), from summary.json or Hydra's record."""
    summary = run_dir.read_summary_if_any() or {}
    if isinstance(summary.get("choices"), dict):
        return summary["choices"]
    try:
        return dict(OmegaConf.load(run_dir.path / ".hydra" / "hydra.yaml").hydra.runtime.choices)
    except Exception:  # no record: the names only label messages
        return {}


def evaluate(target: str | Path, split: str = "test", which: str = "best") -> dict[str, Any]:
    """Evaluate the checkpoint on `split`; write and return `eval_<split>.json`'s content."""
    if split not in SPLITS:
        raise UserError(f"--split {split}: expected one of {', '.join(SPLITS)}.")
    run_dir, checkpoint_path = resolve(target, which)
    check_checkpoint_file(checkpoint_path)  # before torch is imported
    cfg = run_dir.read_config()
    validate(cfg)

    import pytorch_lightning as pl  # heavy: only once the run directory is known to be usable

    from dlrun.data.datamodule import EVAL_BATCH_SIZE, IndexBatches
    from dlrun.run import build_experiment

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available: ..." is noise here
    warnings.filterwarnings("ignore", r".*The `srun` command is available.*")
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, _, module = build_experiment(cfg, _choices(run_dir))
    checkpoint = load_checkpoint(checkpoint_path, module.state_dict())
    module.load_state_dict(checkpoint["state_dict"])
    x, y = datamodule.splits[split]
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(run_dir.path))
    tested = trainer.test(module, dataloaders=IndexBatches(x, y, EVAL_BATCH_SIZE, shuffle=False), verbose=False)
    metrics = {f"{split}/{k.split('/', 1)[-1]}": float(v) for k, v in sorted((tested[0] if tested else {}).items())}
    result = {
        "run_dir": str(run_dir.path),
        "checkpoint": str(checkpoint_path.resolve()),
        "epoch": checkpoint.get("epoch"),
        "split": split,
        "samples": len(x),
        "metrics": metrics,
        "device": str(trainer.strategy.root_device),
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "dlrun_version": __version__,
    }
    write_atomic(run_dir.path / f"eval_{split}.json", json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    """`dlrun-eval`: exit 0 with a table, or 2 with one panel that says what is wrong."""
    parser = argparse.ArgumentParser(prog="dlrun-eval", description="Evaluate a trained dlrun model on one split.")
    parser.add_argument("target", help="a run directory, or a checkpoint file inside one")
    parser.add_argument("--split", choices=SPLITS, default="test", help="data split (default: test)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="which checkpoint of a run directory (default: best)")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.target, args.split, args.checkpoint)
    except UserError as err:
        print_user_error(err)
        sys.exit(2)
    table = Table(title=f"{result['split']} · {result['samples']:,} samples", header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, format_value(value))
    console.print(table)
    console.print(f"checkpoint {result['checkpoint']} (epoch {result['epoch']})")
    console.print(f"written to {Path(result['run_dir']) / ('eval_' + result['split'] + '.json')}")


if __name__ == "__main__":
    main()
