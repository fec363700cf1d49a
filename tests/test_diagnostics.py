"""What the notes' experiments measure beyond the loss, each on a real run: the training data in evaluation
mode (train_eval/*), per-layer activation statistics, a two-weight network's path over the loss contours,
and training on all the training data, without a validation split."""

from __future__ import annotations

import csv
import math

import pytest
import torch

FAST = ["print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false"]


def _rows(path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


# --- the weight trajectory (004 §6.2.2, Figs. 94-97) --------------------------------------------------
def test_ravine_run_draws_its_weight_path(run_dlrun):
    """experiment=ravine's linear model has two weights: trajectory.csv holds them before training and after
    each optimizer step, ending at the trained weights (last.ckpt's); momentum takes them towards w* = (10, 1)."""
    result = run_dlrun(*FAST, "experiment=ravine", "optim=momentum", "trainer.max_epochs=5")
    summary, run_dir = result.summary(), result.run_dir
    rows = _rows(run_dir / "trajectory.csv")
    assert list(rows[0]) == ["step", "net.1.weight[0, 0]", "net.1.weight[0, 1]"]
    assert len(rows) == summary["global_step"] + 1 == 5 * 8 + 1  # the start, then 8 steps an epoch
    path = torch.tensor([[float(r["net.1.weight[0, 0]"]), float(r["net.1.weight[0, 1]"])] for r in rows])
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]["network.net.1.weight"]
    torch.testing.assert_close(path[-1], last.reshape(-1).double().to(path.dtype))
    optimum = torch.tensor([10.0, 1.0])
    assert (path[-1] - optimum).norm() < 0.5 * (path[0] - optimum).norm()
    assert (run_dir / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_diverging_run_still_draws_its_path(run_dlrun):
    """004 Fig. 94 (bottom): plain SGD at lr 1.2 leaves the ravine; the picture shows the steps it took."""
    result = run_dlrun(*FAST, "experiment=ravine", "optim.lr=1.2")
    summary = result.summary()
    assert summary["status"] == "diverged"
    rows = _rows(result.run_dir / "trajectory.csv")
    assert len(rows) == summary["diverged"]["step"] + 2  # the start and every step up to the bad one
    assert abs(float(rows[-1]["net.1.weight[0, 1]"])) > 10  # w2 oscillates outwards
    assert (result.run_dir / "trajectory.png").is_file()


# --- train_eval/*: the training data in evaluation mode ------------------------------------------------
def test_train_eval_measures_the_training_data_as_dlrun_eval_does(run_dlrun):
    """With heavy dropout, train/* (training mode) understate the network; train_eval/* measure the training
    split in evaluation mode after each validation: logged every epoch, monitorable, in summary.json and the
    final table, and equal to what `dlrun-eval --split train` measures on best.ckpt."""
    from dlrun.evaluate import evaluate

    result = run_dlrun(*FAST, "dataset.n_train=400", "trainer.max_epochs=4", "regularizer=dropout",
                       "regularizer.dropout.p=0.6", "trainer.train_eval=true", "callbacks.monitor=train_eval/loss")
    summary, rows = result.summary(), _rows(result.run_dir / "metrics.csv")
    assert {"train_eval/loss", "train_eval/acc", "train_eval/f1"} <= set(rows[0])
    assert "train_eval/dead_relu" not in rows[0] and "val/dead_relu" in rows[0]  # dead units: val and test only
    assert summary["best_value"] == min(float(r["train_eval/loss"]) for r in rows)
    best = rows[summary["best_epoch"]]
    assert summary["metrics"]["train_eval/acc"] == float(best["train_eval/acc"])
    assert float(best["train_eval/loss"]) < float(best["train/loss"])  # dropout off: the network at its best
    assert "train_eval/acc" in result.stdout
    evaluated = evaluate(result.run_dir, split="train")["metrics"]
    assert evaluated["train/loss"] == pytest.approx(summary["metrics"]["train_eval/loss"], rel=1e-5)
    assert evaluated["train/acc"] == pytest.approx(summary["metrics"]["train_eval/acc"])


# --- dataset.val_fraction=0: retraining on all the training data (004 §5.6.2) ----------------------------
def test_without_a_validation_split_every_non_test_sample_trains(tmp_path):
    from dlrun.data.tabular import Digits
    from dlrun.data.text import Text

    digits = Digits(val_fraction=0.0, seed=0)
    digits.prepare()
    n_test = digits.split_size("test")
    assert digits.split_size("val") == 0 and digits.split_size("train") == 1797 - n_test
    assert digits.validation_splits() == ()
    digits.evaluate_train = True
    assert digits.validation_splits() == ("train",)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 40, encoding="utf-8")
    text = Text(path=str(corpus), window=16, stride=4, val_fraction=0.0, seed=0)
    text.prepare()
    assert text.split_size("val") == 0 and text.split_size("train") > text.split_size("test") > 0


def test_val_fraction_zero_trains_a_fixed_number_of_epochs_and_tests_the_last(run_dlrun):
    """The notes' second phase of early stopping: retrain on all the training data for the epochs the first
    phase chose. No validation loop, no early stopping (the default callbacks ask for it: a note says it is
    off), best.ckpt is the last epoch's weights, and the test split still measures it."""
    from dlrun.errors import UserError
    from dlrun.evaluate import evaluate

    result = run_dlrun(*FAST, "dataset.val_fraction=0", "trainer.max_epochs=3")
    summary, rows = result.summary(), _rows(result.run_dir / "metrics.csv")
    assert summary["status"] == "completed" and summary["epochs"] == 3 == len(rows)
    assert "no validation" in result.stdout and "best.ckpt is the last epoch" in " ".join(result.stdout.split())
    assert not any(name.startswith("val/") for name in rows[0]) and summary.get("monitor") is None
    assert summary["best_epoch"] == 2 and summary["metrics"]["train/loss"] == float(rows[-1]["train/loss"])
    assert {"test/loss", "test/acc"} <= set(summary["metrics"])
    n_train = 1797 - math.ceil(0.15 * 1797)  # digits without its test split
    assert summary["global_step"] == 3 * math.ceil(n_train / 64)
    checkpoints = result.run_dir / "checkpoints"
    best, last = (torch.load(checkpoints / f"{name}.ckpt", weights_only=True)["state_dict"] for name in ("best", "last"))
    for key in best:
        torch.testing.assert_close(best[key], last[key])
    evaluated = evaluate(result.run_dir, split="test")["metrics"]  # dlrun-eval: test and train, no val
    assert evaluated["test/acc"] == pytest.approx(summary["metrics"]["test/acc"])
    with pytest.raises(UserError, match="no val split"):
        evaluate(result.run_dir, split="val")


# --- per-layer activation statistics (004 §4.2.2, Fig. 58; §6.4.5) ---------------------------------------
def _activations(run_dir) -> dict[int, list[dict[str, str]]]:
    epochs: dict[int, list[dict[str, str]]] = {}
    for row in _rows(run_dir / "activations.csv"):
        epochs.setdefault(int(row["epoch"]), []).append(row)
    return epochs


def test_activation_statistics_are_the_validation_splits_layer_by_layer(run_dlrun):
    """A deep tanh net at σ = 0.01 (Fig. 58a): before training, each layer's activations are smaller than the
    previous one's. The last epoch's rows are a direct measurement of last.ckpt's network on the validation
    split: mean, standard deviation and the fraction of outputs within 0.01 of ±1."""
    from omegaconf import OmegaConf

    from dlrun.run import build_experiment

    result = run_dlrun(*FAST, "dataset.n_train=300", "trainer.max_epochs=2", "callbacks.activations.enabled=true",
                       "model.depth=4", "model.width=64", "model.activation=tanh", "model.init=normal",
                       "model.init_std=0.01")
    run_dir, summary = result.run_dir, result.summary()
    epochs = _activations(run_dir)
    assert sorted(epochs) == [-1, 0, 1] and [r["layer"] for r in epochs[-1]] == ["net.2", "net.4", "net.6", "net.8"]
    stds = [float(r["std"]) for r in epochs[-1]]
    assert all(deeper < 0.5 * shallower for shallower, deeper in zip(stds, stds[1:], strict=False))  # vanishing
    datamodule, _, module = build_experiment(OmegaConf.load(run_dir / "config.yaml"), summary["choices"])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    a = datamodule.splits["val"][0]
    measured = {}
    with torch.no_grad():
        for name, layer in module.network.eval().net.named_children():
            a = layer(a)
            if isinstance(layer, torch.nn.Tanh):
                values = a.double()
                measured[f"net.{name}"] = (values.mean(), values.std(unbiased=False), ((1 - values.abs()) < 0.01).double().mean())
    for row in epochs[1]:
        mean, std, saturated = measured[row["layer"]]
        assert float(row["mean"]) == pytest.approx(mean.item(), abs=1e-7)
        assert float(row["std"]) == pytest.approx(std.item(), rel=1e-5)
        assert float(row["saturated"]) == pytest.approx(saturated.item()) and row["dead"] == ""
    assert (run_dir / "activations.png").read_bytes()[:4] == b"\x89PNG"


def test_dead_fraction_per_relu_layer_adds_up_to_val_dead_relu(run_dlrun):
    """ReLU layers report their dead units' fraction; weighted by their widths, the layers' fractions are the
    epoch's val/dead_relu (the same counts, not a second measurement). Without the knob: no activations.csv."""
    result = run_dlrun(*FAST, "dataset.n_train=300", "trainer.max_epochs=2", "callbacks.activations.enabled=true",
                       "model.width=[48,24]", "model.init_bias=-0.4")
    run_dir = result.run_dir
    epochs, rows = _activations(run_dir), _rows(run_dir / "metrics.csv")
    for epoch in (0, 1):
        dead = [float(r["dead"]) for r in epochs[epoch]]
        assert [r["kind"] for r in epochs[epoch]] == ["relu", "relu"] and all(r["saturated"] == "" for r in epochs[epoch])
        assert (48 * dead[0] + 24 * dead[1]) / 72 == pytest.approx(float(rows[epoch]["val/dead_relu"]))
    assert 0 < float(rows[1]["val/dead_relu"]) < 1
    plain = run_dlrun(*FAST, "dataset.n_train=300", "trainer.max_epochs=1")
    [plain_dir] = [d for d in plain.run_dirs if d != run_dir]
    assert not (plain_dir / "activations.csv").exists() and not (plain_dir / "trajectory.png").exists()
