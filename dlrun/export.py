"""`dlrun-export <run dir> --format onnx|torchscript`: the trained network as a file other runtimes load.

    dlrun-export outputs/runs/2026-12-01/22-00-31_559037                     # <run dir>/model.onnx
    dlrun-export outputs/runs/2026-12-01/22-00-31_559037 --format torchscript   # <run dir>/model.pt

The run is rebuilt as `dlrun-eval` does (its saved config through `dlrun.run.build_experiment`, the
checkpoint read with `weights_only`). The exported file is the network alone: it takes inputs
preprocessed as in training and returns the network's raw outputs. The sidecar `<file>.json` says
what that means: the normalization to apply (the training split's mean and std), the input shape and
dtype, the task, the class names and what the outputs are. The export is then checked by running it
(onnxruntime for ONNX, torch.jit.load for TorchScript) on the run's test inputs against PyTorch's own
outputs; a mismatch, or a network the format cannot express, ends with exit 2 and a panel.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dlrun import __version__
from dlrun.config import validate
from dlrun.console import console
from dlrun.error_boundary import boundary
from dlrun.errors import UserError
from dlrun.rundir import check_checkpoint_file, write_atomic

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
CHECK_SAMPLES = 64  # test inputs the export is checked on (another batch size than the one it was traced with)
RTOL, ATOL = 1e-4, 1e-5
OUTPUTS = {  # what the network's raw outputs are, per task
    "multiclass": "logits, one per class (softmax gives probabilities)",
    "binary": "one logit per sample (sigmoid gives the probability of class_names[1])",
    "regression": "the predicted values, in the targets' units",
}


class ExportFailed(UserError):
    """The network cannot be written in the format, or the written file does not compute what it does."""


def export(target: str | Path, fmt: str = "onnx", which: str = "best", output: str | Path | None = None) -> dict[str, Any]:
    """Export the run's checkpoint in `fmt`, check it, write the sidecar; return the sidecar's content."""
    from dlrun.evaluate import _choices, _load, require_predictor, resolve

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}.")
    missing = [m for m in ("onnx", "onnxruntime") if fmt == "onnx" and importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--format onnx needs {' and '.join(missing)}, which is not installed.",
                        "pip install 'dlrun[export]'", title="Missing package")
    run_dir, checkpoint_path = resolve(target, which)
    check_checkpoint_file(checkpoint_path)  # before torch is imported
    cfg = run_dir.read_config()
    validate(cfg)
    datamodule, module, checkpoint = _load(run_dir, checkpoint_path, cfg)
    require_predictor(module, datamodule.spec, "dlrun-export")
    model_name = _choices(run_dir).get("model") or cfg.model.get("_target_", "?")
    network = module.network.cpu().eval()
    inputs = datamodule.inputs("test", CHECK_SAMPLES)
    path = Path(output) if output else run_dir.path / FORMATS[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    write = _write_onnx if fmt == "onnx" else _write_torchscript
    try:
        write(network, inputs[:2], path)
        check = _check(fmt, path, network, inputs)
    except Exception as err:  # an operator or construct the format (or its runtime) has no counterpart for
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ExportFailed(
            f"model={model_name} cannot be exported to {fmt} and run back: {type(err).__name__}: {first_line}",
            f"Try the other format (--format {'torchscript' if fmt == 'onnx' else 'onnx'}), or export a run of "
            "another model.", title="Export failed") from err
    if check["max_abs_diff"] > ATOL + RTOL * check["max_abs_reference"]:
        raise ExportFailed(
            f"{path} computes other outputs than model={model_name} in PyTorch: largest difference "
            f"{check['max_abs_diff']:.3g} on {check['samples']} test inputs (tolerance rtol={RTOL}, atol={ATOL}).",
            "Use the other format, or report the model and format.", title="Export does not match")
    spec = datamodule.spec
    sidecar = {
        "format": fmt,
        "file": path.name,
        "model": model_name,
        "run_dir": str(run_dir.path),
        "checkpoint": str(checkpoint_path.resolve()),
        "epoch": checkpoint.get("epoch"),
        "task": spec.task,
        "input": {"name": "input", "shape": ["batch", *spec.input_shape],
                  "dtype": str(inputs.dtype).removeprefix("torch."), "kind": spec.kind},
        "preprocessing": _preprocessing(datamodule),
        "class_names": list(spec.class_names),
        "outputs": {"name": "output", "shape": ["batch", *network(inputs[:1]).shape[1:]], "meaning": OUTPUTS[spec.task]},
        "verified": check,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "dlrun_version": __version__,
    }
    write_atomic(path.with_name(path.name + ".json"), json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def _preprocessing(datamodule) -> dict[str, Any]:
    """What to do to raw inputs before the network: (x - mean) / std with the training split's statistics."""
    if datamodule.norm_stats is None:
        why = "token indices" if datamodule.integer_inputs else "dataset.normalize=false"
        return {"normalize": None, "note": f"none: inputs go in as they are ({why})"}
    mean, std = (t.cpu() for t in datamodule.norm_stats)
    return {"normalize": {"mean": mean.flatten().tolist(), "std": std.flatten().tolist(), "shape": list(mean.shape)},
            "note": "x = (raw - mean) / std, mean and std broadcast with `shape` over a batch of inputs"}


def _write_onnx(network, example, path: Path) -> None:
    import torch

    with warnings.catch_warnings():  # the TorchScript-based exporter: no onnxscript needed, every dlrun model works
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (example,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def _write_torchscript(network, example, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(network, example)
    traced.save(str(path))


def _check(fmt: str, path: Path, network, inputs) -> dict[str, Any]:
    """Run the written file on the test inputs and compare with the network in PyTorch."""
    import numpy as np
    import torch

    with torch.no_grad():
        reference = network(inputs).numpy()
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": inputs.numpy()})[0]
        runtime = f"onnxruntime {onnxruntime.__version__}"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got = loaded(inputs).numpy()
        runtime = f"torch.jit.load (torch {torch.__version__})"
    same_shape = got.shape == reference.shape
    return {"runtime": runtime, "samples": int(len(inputs)),
            "max_abs_diff": float(np.abs(got - reference).max()) if same_shape else float("inf"),
            "max_abs_reference": float(np.abs(reference).max()), "rtol": RTOL, "atol": ATOL}


def main(argv: list[str] | None = None) -> None:
    """`dlrun-export`: exit 0 with what was written and checked, or 2 with one panel."""
    parser = argparse.ArgumentParser(prog="dlrun-export", description="Export a trained dlrun network to ONNX or "
                                     "TorchScript, with a sidecar JSON of its preprocessing, checked by running it.")
    parser.add_argument("target", help="a run directory, or a checkpoint file inside one")
    parser.add_argument("--format", choices=tuple(FORMATS), default="onnx", help="default: onnx")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="default: best")
    parser.add_argument("--output", metavar="FILE", help="default: <run dir>/model.onnx or model.pt")
    args = parser.parse_args(argv)
    with boundary():
        sidecar = export(args.target, args.format, args.checkpoint, args.output)
    written = Path(sidecar["run_dir"]) / sidecar["file"] if not args.output else Path(args.output)
    check = sidecar["verified"]
    console.print(f"[bold]exported[/bold] model={sidecar['model']} (epoch {sidecar['epoch']}) to {written}")
    console.print(f"[green]checked[/green] with {check['runtime']} on {check['samples']} test inputs: largest "
                  f"difference from PyTorch {check['max_abs_diff']:.2g} (tolerance rtol={RTOL}, atol={ATOL})")
    console.print(f"preprocessing, input shape, classes: {written}.json")


if __name__ == "__main__":
    main()
