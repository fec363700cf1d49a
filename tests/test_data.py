"""Data sets: shapes, splits, normalization, task definitions, on-disk loaders, and real training on them."""

from __future__ import annotations

import csv
import gzip
import json
import math
import pickle
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.metrics import f1_score, precision_recall_fscore_support

from dlrun.config import find_problems
from dlrun.data.datamodule import IndexBatches
from dlrun.data.spec import DataSpec
from dlrun.errors import DataError
from dlrun.models.base import build_network
from dlrun.run import build_experiment
from dlrun.training.metrics import EpochMetrics
from dlrun.training.module import Experiment
from dlrun.training.optimizers import optimizer_factory
from dlrun.training.schedulers import schedule_from_config
from dlrun.training.tasks import make_task

# Every data set that needs no download and no file, with its task and one sample's shape (defaults).
GENERATED = {
    "digits": ("multiclass", (1, 8, 8)),
    "iris": ("multiclass", (4,)),
    "wine": ("multiclass", (13,)),
    "breast_cancer": ("binary", (30,)),
    "xor": ("binary", (2,)),
    "moons": ("binary", (2,)),
    "circles": ("binary", (2,)),
    "spirals": ("multiclass", (2,)),
    "blobs": ("multiclass", (2,)),
    "sine": ("regression", (1,)),
    "ravine": ("regression", (2,)),
    "adding": ("regression", (20, 2)),
    "copy": ("multiclass", (21, 8)),
    "parity": ("binary", (10, 1)),
    "sine_seq": ("regression", (20, 1)),
}
SEQUENCES = ["adding", "copy", "parity", "sine_seq"]


@pytest.fixture
def dlrun_main(tmp_path, monkeypatch):
    """Run `dlrun ARGS...` through its real entry point, in this process: torch is imported once.

    Returns the run's summary.json. A user error exits with code 2 (SystemExit) as on the command line.
    """
    from dlrun.cli import main

    monkeypatch.setenv("DLRUN_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it to 1; monkeypatch restores it afterwards
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> dict:
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", ["dlrun", "print_config=false", *args])
        main()
        newest = max((tmp_path / "outputs" / "runs").glob("*/*/summary.json"), key=lambda p: p.stat().st_mtime)
        return json.loads(newest.read_text())

    return run


def _rows(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> list[bytes]:
    """Each sample (input and target) as bytes, sorted: compares data sets as multisets of samples."""
    samples = np.concatenate(
        [np.asarray(x, dtype=np.float32).reshape(len(x), -1), np.asarray(y, dtype=np.float32).reshape(len(y), -1)],
        axis=1,
    )
    return sorted(row.tobytes() for row in samples)


# --- shapes, labels, splits, normalization -------------------------------------------------------------
@pytest.mark.parametrize("name", list(GENERATED))
def test_spec_shapes_and_labels(datamodule, name):
    task, shape = GENERATED[name]
    dm = datamodule(name)
    spec = dm.prepare()
    assert (spec.task, spec.input_shape, spec.name) == (task, shape, name)
    for x, y in dm.splits.values():
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == shape and len(x) == len(y) > 0
        assert torch.isfinite(x).all()
        if task == "multiclass":
            assert y.dtype == torch.long and y.min() >= 0 and y.max() < spec.num_outputs
            assert len(spec.class_names) == spec.num_outputs
        elif task == "binary":
            assert spec.num_outputs == 1 and set(y.unique().tolist()) <= {0.0, 1.0}
        else:
            assert spec.num_outputs == 1 and y.dtype == torch.float32


@pytest.mark.parametrize("name", [n for n in GENERATED if n not in ("xor", "ravine")])  # own splits: see their tests
def test_splits_partition_the_data_reproducibly(datamodule, name):
    """train + val + test hold every sample exactly once; the same seed gives the same split."""
    dm = datamodule(name, "dataset.normalize=false")
    dm.prepare()
    arrays = dm.load()
    together = [torch.cat([dm.splits[s][i] for s in ("train", "val", "test")]) for i in (0, 1)]
    assert _rows(*together) == _rows(arrays.x, arrays.y)
    n = len(arrays.x)
    assert len(dm.splits["test"][0]) == math.ceil(0.15 * n)
    assert abs(len(dm.splits["val"][0]) - 0.15 * n) <= 1

    again = datamodule(name, "dataset.normalize=false")
    again.prepare()
    for split in ("train", "val", "test"):
        assert torch.equal(dm.splits[split][0], again.splits[split][0])
        assert torch.equal(dm.splits[split][1], again.splits[split][1])


def test_another_seed_another_split(datamodule):
    a, b = datamodule("iris", "dataset.normalize=false"), datamodule("iris", "dataset.normalize=false", seed=1)
    a.prepare(), b.prepare()
    assert not torch.equal(a.splits["test"][0], b.splits["test"][0])


@pytest.mark.parametrize("name", ["iris", "moons", "parity"])
def test_split_seed_fixes_the_data_while_the_seed_shuffles(datamodule, name):
    """dataset.split_seed keeps the samples, the split and n_train's subset across run seeds (an ensemble's
    members share one test split); the run's seed still orders the training batches."""
    a = datamodule(name, "dataset.split_seed=7", "dataset.n_train=64", seed=0)
    b = datamodule(name, "dataset.split_seed=7", "dataset.n_train=64", seed=1)
    a.prepare(), b.prepare()
    for split in ("train", "val", "test"):
        assert all(torch.equal(u, v) for u, v in zip(a.splits[split], b.splits[split], strict=True)), split
    first = [next(iter(IndexBatches(*dm.splits["train"], 16, shuffle=True, seed=dm.seed)))[0] for dm in (a, b)]
    assert not torch.equal(*first)
    other = datamodule(name, "dataset.split_seed=8", "dataset.n_train=64", seed=0)
    other.prepare()
    assert not torch.equal(a.splits["test"][0], other.splits["test"][0])


def test_classification_splits_are_stratified(datamodule):
    dm = datamodule("wine")
    dm.prepare()
    counts = {s: np.bincount(y.numpy(), minlength=3) / len(y) for s, (_, y) in dm.splits.items()}
    assert np.abs(counts["val"] - counts["train"]).max() < 0.05
    assert np.abs(counts["test"] - counts["train"]).max() < 0.05


def test_n_train_caps_training_only(datamodule):
    full = datamodule("moons", "dataset.normalize=false")
    capped = datamodule("moons", "dataset.normalize=false", "dataset.n_train=50")
    full.prepare(), capped.prepare()
    assert len(capped.splits["train"][0]) == 50 < len(full.splits["train"][0])
    for split in ("val", "test"):
        assert torch.equal(capped.splits[split][0], full.splits[split][0])


@pytest.mark.parametrize("name", ["digits", "wine", "sine_seq"])
def test_normalization_uses_training_statistics_only(datamodule, name):
    raw, norm = datamodule(name, "dataset.normalize=false"), datamodule(name)
    raw.prepare(), norm.prepare()
    x_train = raw.splits["train"][0]
    channel_dims = (0, 2, 3) if x_train.dim() == 4 else tuple(range(x_train.dim() - 1))
    mean, std = norm.norm_stats
    assert torch.allclose(mean.flatten(), x_train.mean(dim=channel_dims), atol=1e-5)
    expected_std = x_train.std(dim=channel_dims)
    assert torch.allclose(std.flatten(), torch.where(expected_std > 1e-8, expected_std, 1.0), atol=1e-5)
    # the statistics of all the data differ: they were not used
    everything = torch.cat([raw.splits[s][0] for s in ("train", "val", "test")])
    assert not torch.allclose(mean.flatten(), everything.mean(dim=channel_dims), atol=1e-6)
    for split in ("val", "test"):
        assert torch.allclose(norm.splits[split][0], (raw.splits[split][0] - mean) / std, atol=1e-5)


# --- toy problems ------------------------------------------------------------------------------------------
def _fit(compose_cfg, *overrides: str, epochs: int) -> dict[str, float]:
    """Train in-process with dlrun's real data module, network, task and optimizer; return test metrics."""
    cfg = compose_cfg(*overrides)
    assert find_problems(cfg) == []
    dm = instantiate(cfg.dataset, seed=cfg.seed)
    spec = dm.prepare()
    pl.seed_everything(cfg.seed, verbose=False)
    network = build_network(cfg.model, spec, "model")
    module = Experiment(network, make_task(spec), optimizer_factory(cfg.optim), schedule_from_config(cfg.scheduler))
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    return trainer.test(module, datamodule=dm, verbose=False)[0]


def test_xor_is_the_four_points_in_every_split(datamodule):
    dm = datamodule("xor", "dataset.normalize=false")
    dm.prepare()
    for x, y in dm.splits.values():
        assert x.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]] and y.tolist() == [0, 1, 1, 0]
    noisy = datamodule("xor", "dataset.repeat=50", "dataset.noise=0.1")
    noisy.prepare()
    assert sum(len(x) for x, _ in noisy.splits.values()) == 200


def test_xor_needs_a_hidden_layer(compose_cfg):
    """The notes' claim: a linear model gets at most 3 of the 4 points; one hidden layer gets all 4."""
    linear = _fit(compose_cfg, "dataset=xor", "model=logreg", "optim.lr=0.1", epochs=100)
    hidden = _fit(compose_cfg, "dataset=xor", "model=mlp", "model.depth=1", "model.width=8", "optim.lr=0.05",
                  epochs=100)
    assert linear["test/acc"] <= 0.75
    assert hidden["test/acc"] == 1.0 and hidden["test/loss"] < 0.1


@pytest.mark.slow
def test_sine_polynomial_capacity(compose_cfg):
    """004 §1.3: a linear model on x alone underfits sin(2πx); on (x, x², x³) it fits far better."""
    common = ("dataset=sine", "dataset.n_samples=400", "dataset.noise=0.1", "dataset.batch_size=16", "model=linear",
              "optim.lr=0.1")
    line = _fit(compose_cfg, *common, "dataset.degree=1", epochs=60)
    cubic = _fit(compose_cfg, *common, "dataset.degree=3", epochs=60)
    assert line["test/mse"] > 0.15 and line["test/r2"] < 0.7  # the best line leaves ~0.2 of the variance 0.5
    assert cubic["test/mse"] < line["test/mse"] / 2 and cubic["test/r2"] > 0.8


def test_ravine_loss_is_the_notes_quadratic(datamodule):
    """004 §6.2.2: the MSE of ŷ = w·x + b is (0.1 (w1 − w1*))² + (w2 − w2*)² + b², on the training split
    (full batch) and on the four validation corners alike; noise touches the training targets only."""
    dm = datamodule("ravine")
    dm.prepare()
    rng = np.random.default_rng(0)
    for w1, w2, b in rng.normal(0.0, 5.0, size=(5, 3)):
        expected = (0.1 * (w1 - 10.0)) ** 2 + (w2 - 1.0) ** 2 + b**2
        for split in ("train", "val", "test"):
            x, y = dm.splits[split]
            mse = float(((x.double() @ torch.tensor([w1, w2]) + b - y.double()) ** 2).mean())
            assert mse == pytest.approx(expected, rel=1e-6), split
    assert len(dm.splits["train"][0]) == 4 * 64 and len(dm.splits["val"][0]) == 4
    noisy = datamodule("ravine", "dataset.noise=0.5", "dataset.scale=0.01", "dataset.optimum=[2,3]")
    noisy.prepare()
    x, y = noisy.splits["train"]
    assert sorted(set(x[:, 0].tolist())) == pytest.approx([-0.01, 0.01])  # not standardized
    assert float((y - x @ torch.tensor([2.0, 3.0])).std()) == pytest.approx(0.5, rel=0.2)
    x, y = noisy.splits["val"]
    torch.testing.assert_close(y, x @ torch.tensor([2.0, 3.0]))


def test_momentum_beats_sgd_on_the_ravine(dlrun_main):
    """The notes' claim: on the ill-conditioned ravine, momentum gets far closer to the minimum than plain
    SGD at the same rate and budget; above lr 1 plain SGD diverges along the steep w2."""
    sgd = dlrun_main("experiment=ravine", "optim=sgd")
    momentum = dlrun_main("experiment=ravine", "optim=momentum")
    assert sgd["status"] == momentum["status"] == "completed"
    # val/test loss is the quadratic itself: 2.0 at the origin, the linear layer starts near it
    assert 1e-3 < sgd["metrics"]["test/loss"] < 0.5
    assert momentum["metrics"]["test/loss"] < sgd["metrics"]["test/loss"] / 1000
    too_fast = dlrun_main("experiment=ravine", "optim=sgd", "optim.lr=1.2")
    assert too_fast["status"] == "diverged"


# --- sequence tasks: recompute each target from its inputs -------------------------------------------
def test_copy_target_is_the_first_symbol(datamodule):
    arrays = datamodule("copy", "dataset.length=7", "dataset.symbols=5", "dataset.n_samples=300").load()
    assert arrays.x.shape == (300, 8, 5)
    assert np.array_equal(arrays.x.sum(axis=2), np.ones((300, 8)))  # one-hot at every step
    assert np.array_equal(arrays.y, arrays.x[:, 0].argmax(axis=1))
    # the distractors are drawn from the same alphabet, and every symbol is a class
    assert set(arrays.x[:, 1:].argmax(axis=2).ravel()) == set(range(5)) == set(arrays.y)


def test_parity_target_is_the_xor_of_the_bits(datamodule):
    arrays = datamodule("parity", "dataset.length=13", "dataset.n_samples=500").load()
    bits = arrays.x[..., 0].astype(int)
    assert arrays.x.shape == (500, 13, 1) and set(np.unique(bits)) == {0, 1}
    assert np.array_equal(arrays.y, np.bitwise_xor.reduce(bits, axis=1))
    assert 0.4 < arrays.y.mean() < 0.6


def test_adding_target_is_the_sum_of_the_marked_values(datamodule):
    arrays = datamodule("adding", "dataset.length=12", "dataset.n_samples=300").load()
    values, markers = arrays.x[..., 0], arrays.x[..., 1]
    assert np.array_equal(markers.sum(axis=1), np.full(300, 2.0))
    assert (markers[:, :6].sum(axis=1) == 1).all() and (markers[:, 6:].sum(axis=1) == 1).all()
    assert np.allclose(arrays.y, (values * markers).sum(axis=1))


def test_sine_seq_target_is_the_next_value(datamodule):
    """Without noise s_{t+1} = 2 cos(2π/period) s_t - s_{t-1}: the target continues the window."""
    arrays = datamodule("sine_seq", "dataset.noise=0", "dataset.period=10", "dataset.n_samples=200").load()
    s = arrays.x[..., 0].astype(np.float64)
    c = 2 * np.cos(2 * np.pi / 10)
    assert np.allclose(s[:, 2:], c * s[:, 1:-1] - s[:, :-2], atol=1e-5)
    assert np.allclose(arrays.y, c * s[:, -1] - s[:, -2], atol=1e-5)
    noisy = datamodule("sine_seq", "dataset.noise=0.1", "dataset.period=10", "dataset.n_samples=200").load()
    residual = noisy.y - (c * noisy.x[:, -1, 0] - noisy.x[:, -2, 0])
    assert 0.1 < residual.std() < 0.4  # the noise of three values: sqrt(1 + c^2 + 1) * 0.1 ≈ 0.24


# --- vision: torchvision's on-disk formats, written small ----------------------------------------------
def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: 0x00 0x00, type 0x08 (unsigned byte), ndim, big-endian sizes, then the bytes."""
    data = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data += array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_mnist(root: Path, folder: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """40 training and 10 test images: the training files raw, the test files gzipped (both forms occur)."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(40, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(40) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, size=(10, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(10)[::-1],
    }
    for name, array in data.items():
        _write_idx(raw / name, array)
    return data


def _write_cifar(root: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Five training batches of 6 images and a test batch of 10, pickled as in cifar-10-python.tar.gz."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = 10 if name == "test_batch" else 6
        batch = {
            "batch_label": name,
            "labels": [(i + j) % 10 for j in range(n)],
            "data": rng.integers(0, 256, size=(n, 3072)).astype(np.uint8),
            "filenames": [f"{name}_{j}.png" for j in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return batch["data"], np.array(batch["labels"])


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_reads_idx_files(datamodule, tmp_path, name, folder):
    data = _write_mnist(tmp_path, folder, np.random.default_rng(0))
    dm = datamodule(name, f"dataset.root={tmp_path}", "dataset.download=false", "dataset.normalize=false")
    spec = dm.prepare()
    assert (spec.input_shape, spec.num_outputs, len(spec.class_names)) == ((1, 28, 28), 10, 10)
    x_test, y_test = dm.splits["test"]
    assert torch.equal(x_test * 255, torch.tensor(data["t10k-images-idx3-ubyte.gz"][:, None], dtype=torch.float32))
    assert y_test.tolist() == list(range(10))[::-1]
    # validation is cut from the official training files; together they are those files
    together = [torch.cat([dm.splits[s][i] for s in ("train", "val")]) for i in (0, 1)]
    assert _rows(together[0] * 255, together[1]) == _rows(
        data["train-images-idx3-ubyte"][:, None], data["train-labels-idx1-ubyte"]
    )
    assert x_test.min() >= 0 and x_test.max() <= 1


def test_cifar10_reads_pickle_batches(datamodule, tmp_path):
    x_file, y_file = _write_cifar(tmp_path, np.random.default_rng(1))
    dm = datamodule("cifar10", f"dataset.root={tmp_path}", "dataset.download=false")
    spec = dm.prepare()
    assert spec.input_shape == (3, 32, 32) and spec.class_names[0] == "airplane"
    assert sum(len(dm.splits[s][0]) for s in ("train", "val")) == 30
    x_test, y_test = dm.splits["test"]
    mean, std = dm.norm_stats
    assert mean.shape == (1, 3, 1, 1)  # one statistic per colour channel
    restored = (x_test * std + mean) * 255
    assert torch.allclose(restored, torch.tensor(x_file.reshape(-1, 3, 32, 32), dtype=torch.float32), atol=1e-3)
    assert y_test.tolist() == y_file.tolist()


def test_unreadable_files_give_a_data_error(datamodule, tmp_path):
    _write_mnist(tmp_path, "MNIST", np.random.default_rng(0))
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DataError, match="cannot read"):
        datamodule("mnist", f"dataset.root={tmp_path}", "dataset.download=false").prepare()


def test_missing_cifar_files_name_them(datamodule, tmp_path):
    with pytest.raises(DataError) as err:
        datamodule("cifar10", f"dataset.root={tmp_path}", "dataset.download=false").prepare()
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value) and "data_batch_1" in str(err.value)


@pytest.mark.slow
def test_missing_root_exits_2_naming_the_directory(run_dlrun, tmp_path):
    root = tmp_path / "nowhere"
    result = run_dlrun("dataset=mnist", f"dataset.root={root}", "dataset.download=false", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    flat = " ".join(output.split()).replace("│", "").replace(" ", "")  # the panel may wrap the path
    assert str(root / "MNIST" / "raw").replace(" ", "") in flat
    assert "train-images-idx3-ubyte" in flat


# --- text ------------------------------------------------------------------------------------------------
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "its", "bed"]


def _write_text(path: Path, n_words: int = 3000) -> str:
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(WORDS, size=n_words)) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def test_text_windows_are_contiguous_and_shifted(datamodule, tmp_path):
    text = _write_text(tmp_path / "corpus.txt", 500)
    dm = datamodule("text", f"dataset.path={tmp_path / 'corpus.txt'}", "dataset.window=16", "dataset.stride=8")
    spec = dm.prepare()
    vocab = spec.class_names
    assert "".join(vocab) == "".join(sorted(set(text)))
    assert spec.per_step and spec.vocab_size == len(vocab) == spec.num_outputs
    assert spec.input_shape == (16, len(vocab)) and spec.task == "multiclass"
    decode = lambda row: "".join(vocab[i] for i in row.tolist())  # noqa: E731
    n = len(text)
    starts = {"train": 0, "val": n - int(0.15 * n) - int(0.15 * n), "test": n - int(0.15 * n)}
    ends = {"train": starts["val"], "val": starts["test"], "test": n}
    for split, (x, y) in dm.splits.items():
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape and x.shape[1] == 16
        for i in (0, len(x) - 1):  # window i starts at stride·i of its region; targets are shifted by one
            begin = starts[split] + 8 * i
            assert decode(x[i]) == text[begin : begin + 16]
            assert decode(y[i]) == text[begin + 1 : begin + 17]
            assert begin + 17 <= ends[split]  # no window reaches into the next split


def test_text_needs_a_readable_path(datamodule, tmp_path):
    with pytest.raises(DataError, match="dataset.path"):
        datamodule("text").prepare()
    with pytest.raises(DataError, match="no file at"):
        datamodule("text", f"dataset.path={tmp_path / 'absent.txt'}").prepare()
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(DataError, match="dataset.window"):
        datamodule("text", f"dataset.path={tmp_path / 'short.txt'}").prepare()


@pytest.mark.slow
def test_text_language_model_beats_the_unigram_entropy(dlrun_main, tmp_path):
    """An LSTM trained by `dlrun dataset=text` predicts characters better than their frequencies do."""
    text = _write_text(tmp_path / "corpus.txt")
    counts = np.array(list(Counter(text).values()), dtype=float)
    unigram_bits = float(-(counts / counts.sum() * np.log2(counts / counts.sum())).sum())
    summary = dlrun_main(
        "dataset=text", f"dataset.path={tmp_path / 'corpus.txt'}", "dataset.window=32", "model=lstm",
        "optim.lr=0.02", "trainer.max_epochs=4",
    )
    metrics = summary["metrics"]
    assert summary["status"] == "completed"
    assert metrics["test/bpc"] < unigram_bits - 1.0, (metrics["test/bpc"], unigram_bits)  # measured: 0.97 vs 3.39
    assert metrics["test/ppl"] == pytest.approx(2 ** metrics["test/bpc"], rel=1e-4)


# --- every data set runs end to end ------------------------------------------------------------------
SMOKE = [("mlp", name) for name in GENERATED] + [("lstm", name) for name in [*SEQUENCES, "text"]]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "name"), SMOKE, ids=[f"{m}-{n}" for m, n in SMOKE])
def test_debug_fast_runs_on_every_data_set(dlrun_main, tmp_path, model, name):
    """`dlrun dataset=X debug=fast` for every X that needs no download (sequence tasks with an LSTM too)."""
    args = [f"dataset={name}", f"model={model}", "debug=fast"]
    if name == "text":
        _write_text(tmp_path / "corpus.txt", 400)
        args.append(f"dataset.path={tmp_path / 'corpus.txt'}")
    summary = dlrun_main(*args)
    assert summary["status"] == "completed" and summary["choices"]["dataset"] == name
    tested = {k: v for k, v in summary["metrics"].items() if k.startswith("test/")}
    assert tested and all(math.isfinite(v) for v in tested.values())


# --- precision, recall and F1 (validation and test only) ---------------------------------------------------
PRF = ("precision", "recall", "f1")


def _epoch(task, batches, stage: str) -> dict[str, float]:
    """The stage's epoch metrics of (output, target) batches, scored and reduced as in training."""
    metrics = EpochMetrics(task, torch.nn.Identity())
    for output, target in batches:
        metrics.score(output, target, stage)
    return metrics.compute(stage)


def test_multiclass_precision_recall_f1_are_scikit_learns_macro_averages():
    """Summed per class over uneven batches; class 4 occurs but is never predicted (precision 0/0 -> 0), class
    5 neither occurs nor is predicted (left out, as scikit-learn does). Training logs none of them."""
    g = torch.Generator().manual_seed(0)
    scores, target = torch.randn(100, 6, generator=g), torch.randint(0, 5, (100,), generator=g)
    scores[:, 4:] -= 100
    batches = [(scores[:37], target[:37]), (scores[37:], target[37:])]
    task = make_task(DataSpec("toy", "multiclass", (2,), 6))
    metrics = _epoch(task, batches, "val")
    predicted = scores.argmax(1)
    expected = precision_recall_fscore_support(target, predicted, average="macro", zero_division=0)[:3]
    assert [metrics[f"val/{name}"] for name in PRF] == pytest.approx(expected, abs=1e-12)
    assert metrics["val/f1"] == pytest.approx(f1_score(target, predicted, average="macro", zero_division=0))
    precision, recall = expected[:2]
    assert metrics["val/f1"] != pytest.approx(2 * precision * recall / (precision + recall))  # mean of F1s
    assert set(_epoch(task, batches, "train")) == {"train/loss", "train/acc"}


def test_binary_precision_recall_f1_are_scikit_learns_for_label_1():
    """Label 1's at logit > 0, summed over batches; 0 when nothing is positive (zero_division=0)."""
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(90, 1, generator=g), torch.randint(0, 2, (90,), generator=g).float()
    task = make_task(DataSpec("toy", "binary", (2,), 1))
    metrics = _epoch(task, [(logits[:50], target[:50]), (logits[50:], target[50:])], "test")
    expected = precision_recall_fscore_support(target, (logits > 0).float().squeeze(1), zero_division=0)[:3]
    assert [metrics[f"test/{name}"] for name in PRF] == pytest.approx([e[1] for e in expected], abs=1e-12)
    negative = _epoch(task, [(-logits.abs(), torch.zeros(90))], "test")
    assert [negative[f"test/{name}"] for name in PRF] == [0.0, 0.0, 0.0]


def test_a_run_monitors_val_f1_and_its_test_f1_is_scikit_learns(dlrun_main):
    """callbacks.monitor=val/f1 with mode max; summary.json's test metrics are scikit-learn's on the best
    checkpoint's test predictions; metrics.csv has them for validation only."""
    summary = dlrun_main("dataset=breast_cancer", "trainer.max_epochs=3", "callbacks.monitor=val/f1",
                         "callbacks.mode=max")
    run_dir = Path(summary["run_dir"])
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert summary["best_value"] == pytest.approx(max(float(r["val/f1"]) for r in rows))
    columns = set(rows[0])
    assert {f"val/{name}" for name in PRF} <= columns and not {f"train/{name}" for name in PRF} & columns
    datamodule, _, module = build_experiment(OmegaConf.load(run_dir / "config.yaml"), summary["choices"])
    state = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    x, y = datamodule.splits["test"]
    with torch.no_grad():
        predicted = (module.eval()(x) > 0).long().squeeze(1)
    expected = precision_recall_fscore_support(y.long(), predicted, average="binary", zero_division=0)[:3]
    assert [summary["metrics"][f"test/{name}"] for name in PRF] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("task", "outputs"), [("multiclass", 6), ("binary", 1), ("regression", 1)])
def test_training_batches_scored_per_group_equal_scored_one_by_one(monkeypatch, task, outputs):
    """Small training outputs wait for the group's end and are scored concatenated (uneven batches too);
    the epoch's metrics are exactly those of scoring each batch at once, as large outputs are. Regression
    (float sums) is always scored per batch, so that its numbers never depend on the grouping either."""
    import dlrun.training.metrics as metrics_code

    g = torch.Generator().manual_seed(2)
    output = torch.randn(100, outputs, generator=g)
    target = {"multiclass": torch.randint(0, 6, (100,), generator=g),
              "binary": torch.randint(0, 2, (100,), generator=g).float(),
              "regression": torch.randn(100, generator=g)}[task]
    batches = [(output[:37], target[:37]), (output[37:74], target[37:74]), (output[74:], target[74:])]
    spec = make_task(DataSpec("toy", task, (2,), outputs))
    grouped = _epoch(spec, batches, "train")
    assert spec.scores_groups == (task != "regression")
    monkeypatch.setattr(metrics_code, "GROUP_SCORED_NUMEL", 0)
    assert _epoch(spec, batches, "train") == grouped
    assert grouped["train/loss"] == pytest.approx(spec.loss(output, target).item(), rel=1e-6)
