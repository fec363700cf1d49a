"""`dlrun-eval <run dir or checkpoint>`: the metrics of a trained model on one split of its data set.

    dlrun-eval outputs/runs/2026-11-22/02-08-25_867686              # best.ckpt on the test split
    dlrun-eval outputs/runs/.../checkpoints/last.ckpt --split val
    dlrun-eval outputs/sweeps/2026-11-22_10-00-00_123456            # an ensemble of the sweep's runs
    dlrun-eval RUN_A RUN_B RUN_C --json ensemble.json               # an ensemble of these runs

Several runs, or a sweep directory, are evaluated as an ensemble (model averaging, 004 §5.7): each
member alone, their mean, and the ensemble, whose prediction is the members' mean probability (mean
output for regression). The members must have been trained on the same data and split, e.g.
`dlrun -m seed=0,1,2,3,4 dataset.split_seed=0`; other runs are refused.

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
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from dlrun import __version__
from dlrun.config import validate
from dlrun.console import console, format_value
from dlrun.data.spec import INPUT_TASKS
from dlrun.error_boundary import boundary
from dlrun.errors import UserError
from dlrun.rundir import RunDir, check_checkpoint_file, load_checkpoint, write_atomic
from dlrun.trust import TRUST_ENV

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
    summary = run_dir.read_summary_if_any()
    if summary is not None and summary.choices is not None:
        return summary.choices
    try:
        return dict(OmegaConf.load(run_dir.path / ".hydra" / "hydra.yaml").hydra.runtime.choices)
    except Exception:  # no record: the names only label messages
        return {}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"--split {split}: expected one of {', '.join(SPLITS)}.")


def _load(run_dir: RunDir, checkpoint_path: Path, cfg: DictConfig):
    """(data module, Experiment with the checkpoint's weights, checkpoint) of a validated run's config."""
    import pytorch_lightning as pl  # heavy: only once the run directory is known to be usable

    from dlrun.run import build_experiment

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available: ..." is noise here
    warnings.filterwarnings("ignore", r".*The `srun` command is available.*")
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, _, module = build_experiment(cfg, _choices(run_dir), run_dir.read_preprocessing(), train=False)
    checkpoint = load_checkpoint(checkpoint_path, module.state_dict())
    module.load_state_dict(checkpoint["state_dict"])
    return datamodule, module, checkpoint


def require_predictor(module, spec, tool: str) -> None:
    """Refuse a run whose network does not map each input to its own prediction, for the tools that feed it
    inputs one by one (dlrun-predict, dlrun-export): models of the inputs alone, and graph models, which
    read every node of their graph at once."""
    if module.task.kind in INPUT_TASKS:
        raise UserError(f"this run trained a model of the inputs alone ({module.task.kind}): it predicts no "
                        f"targets, which {tool} needs.",
                        "Use dlrun-eval for its metrics; its pictures are in the run directory.", title="Not supported")
    if spec.graph is not None:
        raise UserError(f"this run trained on the nodes of one graph (dataset={spec.name}): its network reads all "
                        f"of them at once, and {tool} gives it inputs one by one.",
                        "Use dlrun-eval for its metrics on the graph's splits.", title="Not supported")


def _test(module, datamodule, split: str, root: Path) -> tuple[dict[str, float], str]:
    """`split`'s metrics of `module`, through Lightning's test loop as in training; and the device used."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root))
    tested = trainer.test(module, dataloaders=datamodule.eval_loader(split), verbose=False)
    metrics = {f"{split}/{k.split('/', 1)[-1]}": float(v) for k, v in sorted((tested[0] if tested else {}).items())}
    return metrics, str(trainer.strategy.root_device)


def _stamp() -> dict[str, str]:
    return {"evaluated_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "dlrun_version": __version__}


def evaluate(target: str | Path, split: str = "test", which: str = "best") -> dict[str, Any]:
    """Evaluate the checkpoint on `split`; write and return `eval_<split>.json`'s content."""
    _check_split(split)
    run_dir, checkpoint_path = resolve(target, which)
    check_checkpoint_file(checkpoint_path)  # before torch is imported
    cfg = run_dir.read_config(complete=True)
    validate(cfg)
    datamodule, module, checkpoint = _load(run_dir, checkpoint_path, cfg)
    if not datamodule.split_size(split):
        raise UserError(f"--split {split}: the run at {run_dir.path} has no {split} split (dataset.val_fraction=0).",
                        "Evaluate --split test or --split train.")
    metrics, device = _test(module, datamodule, split, run_dir.path)
    result = {
        "run_dir": str(run_dir.path),
        "checkpoint": str(checkpoint_path.resolve()),
        "epoch": checkpoint.get("epoch"),
        "split": split,
        "samples": datamodule.split_size(split),
        "metrics": metrics,
        "device": device,
        **_stamp(),
    }
    write_atomic(run_dir.path / f"eval_{split}.json", json.dumps(result, indent=2) + "\n")
    return result


# --- ensembles -------------------------------------------------------------------------------------
def ensemble_members(targets: list[str | Path], which: str = "best") -> list[tuple[RunDir, Path]]:
    """(run directory, checkpoint) of each target; a sweep directory stands for its completed runs."""
    members = []
    for target in targets:
        path = Path(target).expanduser()
        if _is_sweep_dir(path):
            runs = [RunDir(p.parent) for p in sorted(path.glob("*/summary.json"))]
            members += [resolve(r.path, which) for r in runs if _status(r) == "completed"]
        else:
            members.append(resolve(path, which))
    return members


def _status(run_dir: RunDir) -> str | None:
    summary = run_dir.read_summary_if_any()
    return summary.status if summary is not None else None


def _is_sweep_dir(path: Path) -> bool:
    return path.is_dir() and not (path / "config.yaml").is_file() and any(path.glob("*/summary.json"))


def _data_identity(cfg: DictConfig) -> dict[str, Any]:
    """What decides a run's samples and split: its dataset settings (but the batch size) and data seed."""
    data = OmegaConf.to_container(cfg.dataset, resolve=True)
    data.pop("batch_size", None)
    split_seed = data.pop("split_seed", None)
    return {**data, "data seed": cfg.seed if split_seed is None else split_seed}


def evaluate_ensemble(targets: list[str | Path], split: str = "test", which: str = "best",
                      json_path: str | Path | None = None) -> dict[str, Any]:
    """Each member, their mean and their ensemble on `split`; written to `json_path`, or beside the runs
    of a single sweep directory as `ensemble_<split>.json`."""
    _check_split(split)
    members = ensemble_members(targets, which)
    if len(members) < 2:
        raise UserError(f"An ensemble needs at least two trained runs; {', '.join(map(str, targets))} gave "
                        f"{len(members)}.", "Pass several run directories, or a sweep directory with completed runs.",
                        title="Not an ensemble")
    configs = []
    for run_dir, checkpoint_path in members:
        check_checkpoint_file(checkpoint_path)  # every member before torch is imported
        configs.append(run_dir.read_config(complete=True))
        validate(configs[-1])
    first = _data_identity(configs[0])
    for (run_dir, _), cfg in zip(members[1:], configs[1:], strict=True):
        differs = sorted(k for k in first.keys() | _data_identity(cfg).keys()
                         if first.get(k) != _data_identity(cfg).get(k))
        if differs:
            raise UserError(f"{members[0][0].path} and {run_dir.path} were trained on different data "
                            f"({', '.join(differs)} differ), so they share no {split} split to average on.",
                            "Train the members with one data set and a fixed split: "
                            "dlrun -m seed=0,1,2,3,4 dataset.split_seed=0", title="Members see different data")

    from dlrun.models.ensemble import Ensemble
    from dlrun.training.module import Experiment

    loaded = [_load(run_dir, path, cfg) for (run_dir, path), cfg in zip(members, configs, strict=True)]
    datamodule, reference, _ = loaded[0]
    if reference.task.kind in INPUT_TASKS:  # an average of reconstructions is not a model's likelihood
        raise UserError(f"the members trained models of the inputs alone ({reference.task.kind}), which dlrun-eval "
                        "does not average.", "Evaluate each run on its own: dlrun-eval <run dir>.",
                        title="Not supported")
    rows = []
    for (run_dir, path), (member_data, module, checkpoint) in zip(members, loaded, strict=True):
        metrics, _ = _test(module, member_data, split, run_dir.path)
        rows.append({"run_dir": str(run_dir.path), "checkpoint": str(path.resolve()), "epoch": checkpoint.get("epoch"),
                     "metrics": metrics})
    network = Ensemble([module.network for _, module, _ in loaded], datamodule.spec.task)
    averaged = Experiment(network, reference.task)
    metrics, device = _test(averaged, datamodule, split, members[0][0].path)
    shared = [k for k in rows[0]["metrics"] if all(k in r["metrics"] for r in rows)]
    mean = {k: sum(r["metrics"][k] for r in rows) / len(rows) for k in shared}
    result = {"split": split, "samples": datamodule.split_size(split), "members": rows, "member_mean": mean,
              "ensemble": metrics, "device": device, **_stamp()}
    if json_path is None and len(targets) == 1 and _is_sweep_dir(Path(targets[0]).expanduser()):
        json_path = Path(targets[0]).expanduser() / f"ensemble_{split}.json"
    if json_path is not None:
        write_atomic(Path(json_path), json.dumps(result, indent=2) + "\n")
        result["written_to"] = str(json_path)
    return result


def main(argv: list[str] | None = None) -> None:
    """`dlrun-eval`: exit 0 with a table, or 2 with one panel that says what is wrong."""
    parser = argparse.ArgumentParser(prog="dlrun-eval", description="Evaluate a trained dlrun model, or an ensemble "
                                     "of several (a sweep directory, or several run directories), on one split.")
    parser.add_argument("targets", nargs="+", metavar="target",
                        help="a run directory, or a checkpoint file inside one; several, or a sweep directory: an ensemble")
    parser.add_argument("--split", choices=SPLITS, default="test", help="data split (default: test)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="which checkpoint of a run directory (default: best)")
    parser.add_argument("--json", metavar="FILE", help="where an ensemble's result goes (default: ensemble_<split>.json "
                        "in the sweep directory given; a single run's always goes to eval_<split>.json in it)")
    parser.add_argument("--trust", action="store_true", help="build the classes the run's config.yaml names even if "
                        f"dlrun's configs do not define them (as {TRUST_ENV}=1 does)")
    args = parser.parse_args(argv)
    if args.trust:
        os.environ[TRUST_ENV] = "1"
    single = len(args.targets) == 1 and not _is_sweep_dir(Path(args.targets[0]).expanduser())
    with boundary():
        if single:
            result = evaluate(args.targets[0], args.split, args.checkpoint)
        else:
            result = evaluate_ensemble(args.targets, args.split, args.checkpoint, args.json)
    if single:
        _print_single(result)
    else:
        _print_ensemble(result)


def _print_single(result: dict[str, Any]) -> None:
    table = Table(title=f"{result['split']} · {result['samples']:,} samples", header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, format_value(value))
    console.print(table)
    console.print(f"checkpoint {result['checkpoint']} (epoch {result['epoch']})")
    console.print(f"written to {Path(result['run_dir']) / ('eval_' + result['split'] + '.json')}")


def _print_ensemble(result: dict[str, Any]) -> None:
    """One column per member (its run directory's name), their mean, and the ensemble."""
    members = result["members"]
    table = Table(title=f"ensemble of {len(members)} · {result['split']} · {result['samples']:,} samples",
                  header_style="bold")
    table.add_column("metric")
    for member in members:  # a sweep's job directory starts with the job number: "job 3" says enough
        name = Path(member["run_dir"]).name
        table.add_column(f"job {name.split('_')[0]}" if name.split("_")[0].isdigit() else name, justify="right")
    table.add_column("mean", justify="right")
    table.add_column("ensemble", justify="right", style="bold")
    for name, value in result["ensemble"].items():
        cells = [format_value(m["metrics"].get(name)) for m in members]
        table.add_row(name, *cells, format_value(result["member_mean"].get(name)), format_value(value))
    console.print(table)
    if "written_to" in result:
        console.print(f"written to {result['written_to']}")


if __name__ == "__main__":
    main()
