"""A user's own data: CSV/Parquet tables, .npz arrays and image folders, all generated here (no downloads)."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from dlrun.errors import DataError
from dlrun.evaluate import evaluate
from dlrun.run import build_experiment


def write_table(path: Path, n: int = 600, seed: int = 0) -> pd.DataFrame:
    """Houses: a numeric price (regression), a yes/no churn (binary), an integer tier of 3 (multiclass),
    from numeric and text features with missing values in both."""
    rng = np.random.default_rng(seed)
    age = rng.normal(40, 10, n)
    city = rng.choice(["Paris", "Lyon", "Nice"], n)
    income = rng.normal(3, 1, n)
    frame = pd.DataFrame({
        "age": age,
        "city": city,
        "income": income,
        "price": 2000 * age + 30000 * (city == "Paris") + rng.normal(0, 3000, n),
        "churned": np.where(income + (city == "Nice") + rng.normal(0, 0.3, n) > 3.3, "yes", "no"),
        "tier": np.digitize(age + 8 * (city == "Lyon"), [36, 46]),
    })
    frame.loc[::17, "age"] = np.nan
    frame.loc[::23, "city"] = None
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return frame


# --- CSV: inference, preprocessing fitted on the training split -----------------------------------------
def test_task_and_classes_are_inferred_from_the_target(datamodule, tmp_path):
    write_table(tmp_path / "houses.csv")
    expected = {"price": ("regression", ()), "churned": ("binary", ("no", "yes")), "tier": ("multiclass", ("0", "1", "2"))}
    for target, (task, names) in expected.items():
        features = "[age,city,income]"
        spec = datamodule("csv", f"dataset.path={tmp_path / 'houses.csv'}", f"dataset.target={target}",
                          f"dataset.features={features}").prepare()
        assert (spec.task, spec.class_names) == (task, names)
        assert spec.input_shape == (2 + 3,)  # age, income, and one feature per city
    spec = datamodule("csv", f"dataset.path={tmp_path / 'houses.csv'}", "dataset.target=tier",
                      "dataset.features=[age]", "dataset.task=regression").prepare()
    assert (spec.task, spec.input_shape) == ("regression", (1,))


def network_inputs(dm, split: str) -> torch.Tensor:
    """A table's split as the network takes it: held compact (a code per text column), widened per batch."""
    return dm.inputs(split, dm.split_size(split))


def _train_rows(dm) -> np.ndarray:
    """The row numbers of the training split of a table whose column `row` is the row number."""
    x = network_inputs(dm, "train")
    column = dm.preprocessing["columns"][0]
    return np.rint(x[:, 0].double().numpy() * column["std"] + column["mean"]).astype(int)


def test_preprocessing_is_fitted_on_the_training_split_only(datamodule, tmp_path):
    """Values that only validation and test rows hold change neither the statistics nor the categories;
    a category never seen in training becomes an all-zero code."""
    n = 300
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"row": np.arange(n, dtype=float), "size": rng.normal(size=n),
                          "colour": rng.choice(["red", "blue"], n), "label": rng.choice(["a", "b"], n)})
    frame.loc[::10, "size"] = np.nan
    frame.to_csv(tmp_path / "plain.csv", index=False)
    args = ("dataset.target=label", "dataset.features=[row,size,colour]")
    plain = datamodule("csv", f"dataset.path={tmp_path / 'plain.csv'}", *args)
    plain.prepare()
    train = _train_rows(plain)
    held_out = np.setdiff1d(np.arange(n), train)
    assert len(held_out) > 50
    changed = frame.copy()
    changed.loc[held_out, "size"] = 1e6
    changed.loc[held_out[::2], "colour"] = "ultraviolet"
    changed.to_csv(tmp_path / "changed.csv", index=False)
    other = datamodule("csv", f"dataset.path={tmp_path / 'changed.csv'}", *args)
    other.prepare()
    assert np.array_equal(_train_rows(other), train)  # the same split
    assert other.preprocessing == plain.preprocessing
    colour = plain.preprocessing["columns"][2]
    assert colour["categories"] == ["blue", "red"]
    assert plain.preprocessing["columns"][1]["fill"] == pytest.approx(float(np.median(
        frame.loc[train, "size"].dropna())))
    # held-out rows with the unseen colour: all-zero one-hot; the others exactly one 1
    for split in ("val", "test"):
        x = network_inputs(other, split).numpy()
        rows = np.rint(x[:, 0] * plain.preprocessing["columns"][0]["std"] + plain.preprocessing["columns"][0]["mean"])
        unseen = changed.loc[rows.astype(int), "colour"].to_numpy() == "ultraviolet"
        assert unseen.any() and (~unseen).any()
        assert np.all(x[unseen, 2:4] == 0)
        assert np.all(x[~unseen, 2:4].sum(axis=1) == 1)


def test_rows_transformed_column_by_column_on_threads_are_the_plain_formula(datamodule, tmp_path):
    """`Table` transforms each split column by column, on threads, into compact rows that are widened per
    batch; every row the network sees is still (its value, or the training median, minus the mean) / std
    for a numeric column, and a 1 at its value's (or, missing, the most frequent value's) category for a
    text one, none for a value training never saw."""
    n = 400
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"row": np.arange(n, dtype=float), "size": rng.normal(size=n),
                          "colour": rng.choice(["red", "blue", "green"], n), "count": rng.integers(0, 9, n),
                          "shape": rng.choice(["disc", "square"], n), "label": rng.choice(["a", "b"], n)})
    frame.loc[::7, "size"] = np.nan
    frame.loc[::11, "colour"] = None
    rare = [5, 70, 150, 250, 320, 390]
    frame.loc[rare, "shape"] = [f"star{k}" for k in range(len(rare))]  # once each: some miss the training split
    frame.to_csv(tmp_path / "t.csv", index=False)
    dm = datamodule("csv", f"dataset.path={tmp_path / 't.csv'}", "dataset.target=label")
    dm.prepare()
    columns = {c["name"]: c for c in dm.preprocessing["columns"]}
    row, unseen = columns["row"], 0
    for split in ("train", "val", "test"):
        assert dm.splits[split][0].shape[1] == len(columns)  # held compact: one number per column
        x = network_inputs(dm, split)
        rows = np.rint(x[:, 0].double().numpy() * row["std"] + row["mean"]).astype(int)
        if split == "train":  # the statistics: median, then mean and std of the filled training values
            for name in ("row", "size", "count"):
                values = frame.loc[rows, name]
                filled = values.fillna(values.median()).to_numpy(float)
                assert columns[name]["fill"] == values.median()
                assert columns[name]["mean"] == pytest.approx(filled.mean(), rel=1e-12)
                assert columns[name]["std"] == pytest.approx(filled.std(), rel=1e-12)
        expected = []
        for name, c in columns.items():
            values = frame.loc[rows, name]
            if c["kind"] == "numeric":
                expected.append(((values.fillna(c["fill"]).to_numpy(float) - c["mean"]) / c["std"])[:, None])
            else:
                values = values.fillna(c["fill"]).to_numpy()
                expected.append((values[:, None] == np.array(c["categories"])[None, :]).astype(float))
        assert np.array_equal(x.numpy(), np.hstack(expected).astype(np.float32)), split
        unseen += sum(frame.loc[r, "shape"] not in columns["shape"]["categories"] for r in rows)
    assert unseen > 0


def test_a_table_is_held_compact_and_scaled_to_unit_range_for_an_autoencoder(datamodule, tmp_path):
    """Held: one float32 per column; the network sees one input per category. For an autoencoder or a
    VAE (unit inputs) each numeric column is mapped to [0, 1] by its training minimum and range."""
    write_table(tmp_path / "houses.csv")
    args = (f"dataset.path={tmp_path / 'houses.csv'}", "dataset.target=churned", "dataset.features=[age,city,income]")
    dm = datamodule("csv", *args)
    dm.unit_inputs = True
    assert dm.prepare().input_shape == (5,)
    assert dm.splits["train"][0].shape[1] == 3
    train = network_inputs(dm, "train")
    assert torch.equal(train.amin(0), torch.zeros(5)) and torch.equal(train.amax(0), torch.ones(5))
    for split in ("val", "test"):
        assert network_inputs(dm, split)[:, 1:4].sum(1).eq(1).all()  # a city each: none unseen, missing filled
    frame = pd.read_csv(tmp_path / "houses.csv")
    age = dm.preprocessing["columns"][0]
    assert age["std"] > 0 and frame["age"].min() <= age["mean"] <= frame["age"].max()


def test_a_saved_preprocessing_of_format_1_is_applied_but_not_to_unit_inputs(datamodule, tmp_path):
    """Format 1 (before unit inputs were scaled inside it) still transforms a classifier's data as saved; an
    autoencoder's would now be scaled otherwise than it was trained, so it is refused, naming the file's format."""
    write_table(tmp_path / "houses.csv")
    args = (f"dataset.path={tmp_path / 'houses.csv'}", "dataset.target=churned")
    fitted = datamodule("csv", *args)
    fitted.prepare()
    old = {**fitted.preprocessing, "format": 1}
    again = datamodule("csv", *args)
    again.use_preprocessing(old)
    again.prepare()
    assert torch.equal(network_inputs(again, "test"), network_inputs(fitted, "test"))
    autoencoder = datamodule("csv", *args)
    autoencoder.unit_inputs = True
    autoencoder.use_preprocessing(old)
    with pytest.raises(DataError, match="format 1"):
        autoencoder.prepare()


def test_a_streamed_table_gives_the_batches_it_gives_in_memory(datamodule, tmp_path):
    """Both paths widen the same compact rows: the same batches, in the same order, to the bit."""
    write_table(tmp_path / "houses.csv")
    args = (f"dataset.path={tmp_path / 'houses.csv'}", "dataset.target=tier", "dataset.batch_size=32")
    memory, streamed = (datamodule("csv", *args, f"dataset.in_memory={held}") for held in ("true", "false"))
    assert memory.prepare() == streamed.prepare() and memory.spec.input_shape == (8,)  # 2 text columns: 3 + 2
    assert (memory.data_path["mode"], streamed.data_path["mode"]) == ("in memory", "streamed")
    for loaders in ((memory.train_dataloader(), streamed.train_dataloader()),
                    (memory.eval_loader("test"), streamed.eval_loader("test"))):
        pairs = list(zip(*loaders, strict=True))
        assert pairs and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)
        assert pairs[0][0][0].shape[1] == 8


def test_missing_values_are_imputed_or_refused(datamodule, tmp_path):
    write_table(tmp_path / "houses.csv")
    dm = datamodule("csv", f"dataset.path={tmp_path / 'houses.csv'}", "dataset.target=price")
    dm.prepare()
    assert all(not np.isnan(x.numpy()).any() for x, _ in dm.splits.values())
    with pytest.raises(DataError, match="'age'.*'city'"):
        datamodule("csv", f"dataset.path={tmp_path / 'houses.csv'}", "dataset.target=price",
                   "dataset.missing=error").prepare()


def test_parquet_reads_like_csv(datamodule, tmp_path):
    pytest.importorskip("pyarrow")
    write_table(tmp_path / "houses.csv")
    write_table(tmp_path / "houses.parquet")
    a = datamodule("csv", f"dataset.path={tmp_path / 'houses.csv'}", "dataset.target=churned")
    b = datamodule("csv", f"dataset.path={tmp_path / 'houses.parquet'}", "dataset.target=churned")
    assert a.prepare() == b.prepare()
    for split in ("train", "val", "test"):
        assert np.allclose(network_inputs(a, split).numpy(), network_inputs(b, split).numpy(), atol=1e-5)


# --- the cache of parsed tables --------------------------------------------------------------------------
def write_aged_table(path: Path, seed: int = 0, age_s: float = 60) -> pd.DataFrame:
    """`write_table`'s houses plus an integer and a boolean column, modified `age_s` seconds ago (a file as fresh
    as a tick of the file system's clock is not cached)."""
    frame = write_table(path, seed=seed)
    frame["rooms"] = np.random.default_rng(seed).integers(1, 6, len(frame))
    frame["garden"] = frame["rooms"] > 2
    frame.to_csv(path, index=False)
    old = path.stat().st_mtime - age_s
    os.utime(path, (old, old))
    return frame


def cached_csv(datamodule, path: Path, cache: Path, target: str = "churned", *more: str):
    dm = datamodule("csv", f"dataset.path={path}", f"dataset.target={target}", f"dataset.cache_dir={cache}",
                    "dataset.cache_min_mb=0", *more)
    dm.prepare()
    return dm


def same_data(a, b) -> bool:
    return a.preprocessing == b.preprocessing and all(
        torch.equal(x, y) for split in ("train", "val", "test") for x, y in zip(a.splits[split], b.splits[split], strict=True))


@pytest.mark.parametrize("target", ["churned", "price", "tier", "city"])
def test_a_parsed_table_is_cached_and_a_later_load_reads_the_same_data(datamodule, tmp_path, target):
    write_aged_table(tmp_path / "houses.csv")
    plain = datamodule("csv", f"dataset.path={tmp_path / 'houses.csv'}", f"dataset.target={target}", "dataset.cache_dir=null")
    plain.prepare()
    built = cached_csv(datamodule, tmp_path / "houses.csv", tmp_path / "cache", target)
    read = cached_csv(datamodule, tmp_path / "houses.csv", tmp_path / "cache", target)
    assert (plain.notes.get("cache"), built.notes["cache"], read.notes["cache"]) == (None, "built", "read")
    assert same_data(plain, built) and same_data(plain, read)
    assert plain.target_classes == read.target_classes and plain.task == read.task
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".bin", ".json"]  # no temporary file left
    small = datamodule("csv", f"dataset.path={tmp_path / 'houses.csv'}", f"dataset.target={target}",
                       f"dataset.cache_dir={tmp_path / 'other'}")  # the default cache_min_mb: this file is too small
    small.prepare()
    assert "cache" not in small.notes and not (tmp_path / "other").exists()


def test_a_changed_table_is_parsed_again_and_a_fresh_one_is_not_cached(datamodule, tmp_path):
    path, cache = tmp_path / "houses.csv", tmp_path / "cache"
    write_aged_table(path)
    first = cached_csv(datamodule, path, cache)
    write_aged_table(path, seed=1, age_s=30)  # new rows: a new modification time names a new cache
    changed = cached_csv(datamodule, path, cache)
    assert changed.notes["cache"] == "built" and len(list(cache.glob("*.bin"))) == 2
    assert changed.preprocessing != first.preprocessing
    write_table(path, seed=2)  # just written: its time may share a clock tick with a rewrite to come
    fresh = cached_csv(datamodule, path, cache)
    assert fresh.notes["cache"].startswith("not written (the file was modified") and len(list(cache.glob("*.bin"))) == 2


def test_a_table_the_cache_cannot_hold_is_still_read(datamodule, tmp_path):
    path = tmp_path / "houses.csv"
    frame = write_aged_table(path)
    frame["garden"] = frame["garden"].where(frame.index % 7 > 0)  # booleans with gaps: pandas holds Python objects
    frame.to_csv(path, index=False)
    os.utime(path, (0, 1e9))
    dm = cached_csv(datamodule, path, tmp_path / "cache")
    assert dm.notes["cache"] == "not written (the column 'garden' holds object values)"
    blocked = tmp_path / "a file"
    blocked.write_text("")
    write_aged_table(path)
    dm = cached_csv(datamodule, path, blocked)  # cache_dir is a file: nothing can be written there
    assert dm.notes["cache"].startswith("not written (") and dm.spec.task == "binary"


@pytest.mark.slow
def test_a_second_dlrun_and_dlrun_eval_read_the_cache_and_get_the_same_numbers(run_dlrun, tmp_path):
    write_aged_table(tmp_path / "houses.csv")
    args = ("dataset=csv", f"dataset.path={tmp_path / 'houses.csv'}", "dataset.target=churned", "dataset.cache_min_mb=0",
            f"paths.data_dir={tmp_path / 'data'}", "trainer.max_epochs=3")  # absolute: dlrun-eval runs from elsewhere
    first_dir = run_dlrun(*args).run_dir
    second = run_dlrun(*args)
    second_dir = next(d for d in second.run_dirs if d != first_dir)
    summaries = [second.summary(d) for d in (first_dir, second_dir)]
    assert [s["data_notes"]["cache"] for s in summaries] == ["built", "read"]
    assert len(list((tmp_path / "data" / "table_cache").glob("houses-*.bin"))) == 1  # under paths.data_dir
    assert "cache read" in second.stdout
    assert summaries[1]["metrics"] == summaries[0]["metrics"]  # the same seed: the same numbers
    evaluated = evaluate(second_dir)
    for name, value in evaluated["metrics"].items():
        assert value == pytest.approx(summaries[0]["metrics"][name], rel=1e-5, abs=1e-6), name


def damage(cache: Path, rng: np.random.Generator) -> str:
    """One random harm to a cache's files: bytes of the data flipped, the record cut short, a file emptied or
    removed, or a field of the record given a wrong value or type; half of those with the record's checksum
    made to match, as a record written to mislead would be."""
    data, record = next(cache.glob("*.bin")), next(cache.glob("*.json"))
    meta = json.loads(record.read_text())
    column = meta["columns"][int(rng.integers(len(meta["columns"])))]
    text = next(c for c in meta["columns"] if "levels" in c)
    wrong = [None, -64, 64, 1 << 40, "0", [], 3.5, True, "object"]
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731

    def flip() -> None:
        raw = bytearray(data.read_bytes())
        raw[int(rng.integers(len(raw)))] ^= 0xFF
        data.write_bytes(bytes(raw))

    files = {
        "flip": flip,
        "cut record": lambda: record.write_text(record.read_text()[: int(rng.integers(1, 200))]),
        "empty data": lambda: data.write_bytes(b""),
        "no data": lambda: data.unlink(),
        "no record": lambda: record.unlink(),
    }
    fields = {
        "field": lambda: column.update({pick(["offset", "dtype", "crc32"]): pick(wrong)}),
        "rows": lambda: meta.update(rows=pick(wrong)),
        "format": lambda: meta.update(format=99),
        "levels": lambda: text.update(levels=pick([["a", "a", "b"], ["a"], [1, 2, 3], "abc", None])),
        "columns": lambda: meta.update(columns=pick([None, [], [1], [[]], {}, "abc"])),
    }
    name = pick(list(files) + list(fields))
    if name in files:
        files[name]()
        return name
    fields[name]()
    crafted = bool(rng.integers(2))
    meta.pop("check")
    if crafted:
        meta["check"] = zlib.crc32(json.dumps(meta, sort_keys=True).encode())
    record.write_text(json.dumps(meta))
    return f"{name}{' (crafted)' if crafted else ''}"


def test_a_damaged_cache_is_rebuilt_never_trusted(datamodule, tmp_path):
    path, cache = tmp_path / "houses.csv", tmp_path / "cache"
    write_aged_table(path)
    plain = cached_csv(datamodule, path, tmp_path / "unused")
    rng = np.random.default_rng(0)
    for _ in range(40):
        harm = damage(cache, rng) if cache.exists() else "none yet"
        dm = cached_csv(datamodule, path, cache)
        assert same_data(plain, dm), harm
        assert dm.notes["cache"] in ("built", "rebuilt (the old one was damaged)", "read"), harm
        if harm != "none yet":
            assert dm.notes["cache"] == "rebuilt (the old one was damaged)", harm
        assert cached_csv(datamodule, path, cache).notes["cache"] == "read"  # the rebuilt cache is sound


@pytest.mark.slow
@pytest.mark.parametrize(("target", "metric", "better_than"), [
    ("price", "test/r2", 0.5), ("churned", "test/acc", None), ("tier", "test/acc", None),
])
def test_dlrun_trains_on_a_csv_and_dlrun_eval_transforms_it_the_same(run_dlrun, tmp_path, target, metric, better_than):
    frame = write_table(tmp_path / "houses.csv")
    result = run_dlrun("dataset=csv", f"dataset.path={tmp_path / 'houses.csv'}", f"dataset.target={target}",
                       "dataset.features=[age,city,income]", "trainer.max_epochs=30", "optim.lr=0.01")
    summary = result.summary()
    chance = frame[target].value_counts(normalize=True).max()  # always predicting the commonest class
    assert summary["metrics"][metric] > (better_than if better_than is not None else chance + 0.05), summary["metrics"]
    saved = json.loads((result.run_dir / "preprocessing.json").read_text())
    assert saved["target"] == target and [c["name"] for c in saved["columns"]] == ["age", "city", "income"]
    # dlrun-eval applies the saved file; refitting from the config gives the same file and the same metrics
    evaluated = evaluate(result.run_dir)
    for name, value in evaluated["metrics"].items():
        assert value == pytest.approx(summary["metrics"][name], rel=1e-5, abs=1e-6), name
    refitted, _, _ = build_experiment(OmegaConf.load(result.run_dir / "config.yaml"), {"dataset": "csv"})
    assert refitted.preprocessing == saved


# --- arrays ---------------------------------------------------------------------------------------------
SHAPES = {"flat": (6,), "sequence": (5, 3), "image": (1, 6, 6)}


def write_arrays(path: Path, shape: tuple[int, ...], n: int = 240, labels: str = "int") -> tuple[np.ndarray, np.ndarray]:
    """X of `shape` per sample whose mean decides the label: learnable in a few epochs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    score = x.reshape(n, -1).mean(axis=1)
    y = {"int": (score > 0).astype(np.int64) + (score > 0.3), "float": score.astype(np.float64),
         "str": np.where(score > 0, "up", "down")}[labels]
    if path.suffix == ".npz":
        np.savez(path, X=x, y=y)
    else:
        path.mkdir()
        np.save(path / "X.npy", x)
        np.save(path / "y.npy", y)
    return x, y


@pytest.mark.parametrize("kind", list(SHAPES))
def test_arrays_of_each_shape(datamodule, tmp_path, kind):
    write_arrays(tmp_path / "features.npz", SHAPES[kind])
    spec = datamodule("arrays", f"dataset.path={tmp_path / 'features.npz'}").prepare()
    assert (spec.kind, spec.input_shape, spec.task, spec.class_names) == (kind, SHAPES[kind], "multiclass", ("0", "1", "2"))


def test_arrays_infer_the_task_from_y_and_read_npy_pairs(datamodule, tmp_path):
    write_arrays(tmp_path / "reg.npz", (4,), labels="float")
    write_arrays(tmp_path / "pair", (4,), labels="str")
    assert datamodule("arrays", f"dataset.path={tmp_path / 'reg.npz'}").prepare().task == "regression"
    spec = datamodule("arrays", f"dataset.path={tmp_path / 'pair'}").prepare()
    assert (spec.task, spec.class_names) == ("binary", ("down", "up"))
    np.savez(tmp_path / "named.npz", inputs=np.ones((20, 2)), labels=np.arange(20) % 2)
    spec = datamodule("arrays", f"dataset.path={tmp_path / 'named.npz'}", "dataset.x_key=inputs",
                      "dataset.y_key=labels", "dataset.task=multiclass").prepare()
    assert (spec.task, spec.num_outputs) == ("multiclass", 2)


def test_arrays_of_python_objects_are_refused(datamodule, tmp_path):
    np.save(tmp_path / "X.npy", np.ones((10, 2)))
    np.save(tmp_path / "y.npy", np.array([{"label": i % 2} for i in range(10)], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="Python objects"):
        datamodule("arrays", f"dataset.path={tmp_path}").prepare()


@pytest.mark.slow
def test_dlrun_trains_on_arrays(run_dlrun, tmp_path):
    write_arrays(tmp_path / "features.npz", SHAPES["image"], n=600)
    summary = run_dlrun("dataset=arrays", "dataset.path=features.npz", "model=cnn", "trainer.max_epochs=15").summary()
    assert summary["metrics"]["test/acc"] > 0.6, summary["metrics"]  # three classes; the commonest holds ~38%


# --- image folders --------------------------------------------------------------------------------------
COLOURS = {"cats": (200, 60, 60), "dogs": (60, 60, 200), "owls": (60, 200, 60)}


def write_images(root: Path, per_class: int = 12, classes=("cats", "dogs"), corrupt: bool = True) -> list[Path]:
    """PNG and JPEG files of mixed sizes whose colour is their class, and (`corrupt`) one file that is not an image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    written = []
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = [(20, 30), (40, 24), (33, 33)][i % 3]
            pixels = np.clip(rng.normal(COLOURS[name], 40, size=(height, width, 3)), 0, 255).astype(np.uint8)
            path = root / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(pixels).save(path)
            written.append(path)
    if corrupt:
        (root / classes[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return written


def test_image_folder_decodes_once_skips_bad_files_and_reads_the_cache_later(datamodule, tmp_path):
    write_images(tmp_path / "pets")
    args = (f"dataset.root={tmp_path / 'pets'}", f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.size=16")
    first = datamodule("image_folder", *args)
    spec = first.prepare()
    assert (spec.input_shape, spec.class_names) == ((3, 16, 16), ("cats", "dogs"))
    assert first.notes == {"cache": "built", "images": 24, "decoded": 24, "bad_images": 1}
    second = datamodule("image_folder", *args)
    second.prepare()
    assert second.notes == {"cache": "read", "images": 24, "decoded": 0, "bad_images": 1}
    for split in ("train", "val", "test"):
        assert torch.equal(first.splits[split][0], second.splits[split][0])
    # the colour survives decoding: the red channel separates the classes
    x, y = first.splits["train"]
    red = x[:, 0].mean(dim=(1, 2))
    assert red[y == 0].min() > red[y == 1].max()
    with pytest.raises(DataError, match="broken.jpg"):
        datamodule("image_folder", *args, "dataset.bad_images=error").prepare()


def test_a_changed_file_makes_a_new_cache_and_a_damaged_cache_is_rebuilt(datamodule, tmp_path):
    from PIL import Image

    files = write_images(tmp_path / "pets", corrupt=False)
    args = (f"dataset.root={tmp_path / 'pets'}", f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.size=8")
    datamodule("image_folder", *args).prepare()
    (cache,) = (tmp_path / "cache").glob("*.npy")
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(files[0])
    changed = datamodule("image_folder", *args)
    changed.prepare()
    assert changed.notes["cache"] == "built" and changed.notes["decoded"] == 24
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    cache.unlink()
    (new,) = (tmp_path / "cache").glob("*.npy")
    with open(new, "r+b") as f:
        f.truncate(new.stat().st_size - 100)
    rebuilt = datamodule("image_folder", *args)
    rebuilt.prepare()
    assert rebuilt.notes["cache"].startswith("rebuilt") and rebuilt.notes["decoded"] == 24
    for split in ("train", "val", "test"):
        assert torch.equal(rebuilt.splits[split][0], changed.splits[split][0])
    with open(new, "r+b") as f:  # same size, other bytes: the checksum catches it
        f.seek(-50, 2)
        f.write(b"\x07" * 50)
    again = datamodule("image_folder", *args)
    again.prepare()
    assert again.notes["cache"].startswith("rebuilt")


def test_split_folders_are_the_splits_and_grey_is_one_channel(datamodule, tmp_path):
    for split, n in (("train", 9), ("val", 3), ("test", 4)):
        write_images(tmp_path / "pets" / split, per_class=n, classes=("cats", "dogs", "owls"), corrupt=False)
    dm = datamodule("image_folder", f"dataset.root={tmp_path / 'pets'}", f"dataset.cache_dir={tmp_path / 'cache'}",
                    "dataset.size=12", "dataset.channels=1")
    spec = dm.prepare()
    assert (spec.input_shape, spec.num_outputs) == ((1, 12, 12), 3)
    assert {k: len(v[0]) for k, v in dm.splits.items()} == {"train": 27, "val": 9, "test": 12}
    (tmp_path / "pets" / "test").rename(tmp_path / "held")  # train/ and val/ only: the test split is cut from train/
    only_val = datamodule("image_folder", f"dataset.root={tmp_path / 'pets'}",
                          f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.size=12")
    only_val.prepare()
    assert len(only_val.splits["val"][0]) == 9 and len(only_val.splits["train"][0]) + len(only_val.splits["test"][0]) == 27


@pytest.mark.slow
def test_dlrun_trains_on_an_image_folder_with_augmentation_and_the_second_run_decodes_nothing(run_dlrun, tmp_path):
    write_images(tmp_path / "pets", per_class=40)
    args = ("dataset=image_folder", "dataset.root=pets", "dataset.size=16", "model=cnn", "regularizer=augment",
            "trainer.max_epochs=4")
    first = run_dlrun(*args).summary()
    assert first["data_notes"] == {"cache": "built", "images": 80, "decoded": 80, "bad_images": 1}
    assert first["metrics"]["test/acc"] > 0.8, first["metrics"]  # two classes of different colours
    assert (tmp_path / "data" / "image_cache").is_dir()  # under paths.data_dir
    second = run_dlrun(*args, "seed=1")
    summary = max((second.output_dir / "runs").glob("*/*/summary.json"), key=lambda p: p.stat().st_mtime)
    assert json.loads(summary.read_text())["data_notes"]["decoded"] == 0
    assert "bad_images 1" in second.stdout


# --- bad input: exit 2, one panel naming the file, column or folder ----------------------------------------
def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """{case: (overrides, what the panel must name)}, with the files each case needs written into `tmp`."""
    write_table(tmp / "houses.csv")
    (tmp / "empty.csv").write_text("")
    pd.DataFrame({"age": [1.0, 2.0, 3.0, 4.0], "label": ["a"] * 4}).to_csv(tmp / "one_class.csv", index=False)
    (tmp / "a_folder").mkdir()
    write_images(tmp / "one_class_pets", per_class=3, classes=("cats",), corrupt=False)
    (tmp / "no_images" / "cats").mkdir(parents=True)
    (tmp / "no_images" / "cats" / "notes.txt").write_text("no image here")
    csv = ["dataset=csv", "dataset.target=price"]
    return {
        "missing file": ([*csv, "dataset.path=absent.csv"], ["absent.csv"]),
        "empty file": ([*csv, "dataset.path=empty.csv"], ["empty.csv", "empty"]),
        "no such target": (["dataset=csv", "dataset.path=houses.csv", "dataset.target=cost"],
                           ["'cost'", "age,", "city,", "income,", "price,", "churned,", "tier"]),
        "one class": (["dataset=csv", "dataset.path=one_class.csv", "dataset.target=label"], ["'label'", "one class"]),
        "cannot encode": ([*csv, "dataset.path=houses.csv", "dataset.max_categories=2"], ["'city'", "max_categories"]),
        "directory for a file": ([*csv, "dataset.path=a_folder"], ["a_folder", "is a directory"]),
        "file for a directory": (["dataset=image_folder", "dataset.root=houses.csv"], ["houses.csv", "is a file"]),
        "one image class": (["dataset=image_folder", "dataset.root=one_class_pets"], ["one_class_pets", "cats"]),
        "no images": (["dataset=image_folder", "dataset.root=no_images"], ["no_images", "no images"]),
        "missing arrays": (["dataset=arrays", "dataset.path=features.npz"], ["features.npz"]),
        "negative cache size": ([*csv, "dataset.path=houses.csv", "dataset.cache_min_mb=-1"], ["dataset.cache_min_mb", ">= 0"]),
        "cache dir not a string": ([*csv, "dataset.path=houses.csv", "dataset.cache_dir=[1]"], ["dataset.cache_dir", "string"]),
    }


BAD_INPUTS = ["missing file", "empty file", "no such target", "one class", "cannot encode", "directory for a file",
              "file for a directory", "one image class", "no images", "missing arrays", "negative cache size",
              "cache dir not a string"]


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_naming_it(run_dlrun, tmp_path, case):
    overrides, named = _bad_inputs(tmp_path)[case]
    result = run_dlrun(*overrides, check=False)
    # the panel wraps long lines between its borders: join them back
    panel = " ".join(" ".join(line.strip(" │╭╮╰╯─").split()) for line in (result.stdout + result.stderr).splitlines())
    assert result.returncode == 2, panel
    assert "Traceback" not in panel
    for text in named:
        assert text in panel, (text, panel)
