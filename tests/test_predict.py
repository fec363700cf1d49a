"""dlrun-predict: real runs on tiny generated data, then predictions on new inputs in each format dlrun trains on."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dlrun.predict import main
from tests.test_user_data import write_arrays, write_images, write_table


def predict(capsys, *args: str) -> tuple[int, str]:
    """Run `dlrun-predict ARGS...` in this process: (exit code, what it printed)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def refused(capsys, *args: str) -> str:
    """The panel of a refused `dlrun-predict ARGS...` (inputs named relative to the test's directory)."""
    code, printed = predict(capsys, *args)
    assert code == 2, printed
    assert "Traceback" not in printed, printed
    return " ".join(line.strip("│ ") for line in printed.splitlines())  # the panel's lines, unwrapped


@pytest.mark.parametrize("target", ["price", "tier", "churned"])
def test_csv_runs_predict_on_new_rows_as_in_training(run_dlrun, tmp_path, capsys, monkeypatch, target):
    monkeypatch.chdir(tmp_path)  # inputs named as a user would, relative to here
    frame = write_table(tmp_path / "houses.csv")
    run_dir = run_dlrun("dataset=csv", f"dataset.path={tmp_path / 'houses.csv'}", f"dataset.target={target}",
                        "dataset.features=[age,city,income]", "trainer.max_epochs=5", "optim.lr=0.01").run_dir
    # the training file itself (its target column is ignored), and new rows: an unseen city, missing values
    code, printed = predict(capsys, run_dir, "houses.csv")
    assert code == 0, printed
    seen = pd.read_csv(run_dir / "predictions.csv", dtype={"predicted": str})
    assert len(seen) == len(frame) and seen["id"].tolist() == list(range(len(frame)))
    new = pd.DataFrame({"income": [3.0, 2.0, 4.5], "city": ["Paris", "Berlin", None], "age": [30.0, np.nan, 50.0]})
    new.to_csv(tmp_path / "new.tsv", sep="\t", index=False)
    code, printed = predict(capsys, run_dir, "new.tsv", "--out", tmp_path / "out" / "new.csv")
    assert code == 0, printed
    predicted = pd.read_csv(tmp_path / "out" / "new.csv", dtype={"predicted": str})
    assert predicted["id"].tolist() == [0, 1, 2] and predicted.notna().all().all()
    if target == "price":
        assert list(predicted.columns) == ["id", "predicted"]
        # in the target's units (the standardization undone): close to the price on the training rows
        error = (seen["predicted"].astype(float) - frame["price"]).abs().median()
        assert error < 0.5 * frame["price"].std(), error
        assert predicted["predicted"].astype(float).between(frame["price"].min() - 3e4, frame["price"].max() + 3e4).all()
        return
    classes = sorted(frame[target].astype(str).unique())  # tier: 0, 1, 2; churned (binary, sigmoid): no, yes
    probabilities = [f"probability_{c}" for c in classes]
    assert list(seen.columns) == list(predicted.columns) == ["id", "predicted", *probabilities]
    assert np.allclose(seen[probabilities].sum(axis=1), 1.0, atol=1e-6)
    assert (seen["predicted"] == frame[target].astype(str)).mean() > 0.7  # the commonest class holds < 0.55
    assert set(predicted["predicted"]) <= set(classes)
    if target == "churned":
        return
    # several tables at once: each row predicted as on its own, though each file holds other cities
    by_city = {city: frame[frame["city"] == city].head(5) for city in ("Paris", "Lyon")}
    alone = {}
    for city, rows in by_city.items():
        rows.to_csv(tmp_path / f"{city}.csv", index=False)
        assert predict(capsys, run_dir, f"{city}.csv", "--out", tmp_path / f"{city}_out.csv")[0] == 0
        alone[city] = pd.read_csv(tmp_path / f"{city}_out.csv", dtype={"predicted": str})
    assert predict(capsys, run_dir, "Paris.csv", "Lyon.csv", "--out", tmp_path / "both.csv")[0] == 0
    both = pd.read_csv(tmp_path / "both.csv", dtype={"predicted": str})
    expected = pd.concat([alone["Paris"], alone["Lyon"]], ignore_index=True)
    assert both["id"].tolist() == [f"{c}.csv/{i}" for c in ("Paris", "Lyon") for i in range(5)]
    assert np.allclose(both[probabilities].to_numpy(), expected[probabilities].to_numpy(), atol=1e-6)
    # inputs that do not fit: each named in a panel, exit 2
    new.drop(columns=["age", "city"]).to_csv(tmp_path / "partial.csv", index=False)
    assert "'age', 'city'" in refused(capsys, run_dir, "partial.csv")
    new.assign(income=["a", "b", "c"]).to_csv(tmp_path / "texty.csv", index=False)
    assert "'income'" in refused(capsys, run_dir, "texty.csv")
    (tmp_path / "empty.csv").write_text("")
    assert "empty.csv is empty" in refused(capsys, run_dir, "empty.csv")
    (tmp_path / "notes.txt").write_text("age,city,income\n1,Paris,2\n")
    assert "notes.txt is a file of unknown type (.txt)" in refused(capsys, run_dir, "notes.txt")
    np.savez(tmp_path / "x.npz", X=np.ones((2, 3)))
    assert "x.npz is an .npz file; a run of dataset=csv predicts from a table" in refused(capsys, run_dir, "x.npz")
    assert "no file or folder" in refused(capsys, run_dir, "missing.csv")


def test_an_arrays_run_predicts_on_an_npz_and_refuses_another_shape(run_dlrun, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # inputs named as a user would, relative to here
    x, y = write_arrays(tmp_path / "features.npz", (6,), n=400)
    run_dir = run_dlrun("dataset=arrays", f"dataset.path={tmp_path / 'features.npz'}", "model=mlp", "trainer.max_epochs=5").run_dir
    np.savez(tmp_path / "new.npz", X=x)  # no y needed
    code, printed = predict(capsys, run_dir, tmp_path / "new.npz")
    assert code == 0, printed
    predicted = pd.read_csv(run_dir / "predictions.csv")
    assert list(predicted.columns) == ["id", "predicted", "probability_0", "probability_1", "probability_2"]
    assert (predicted["predicted"].to_numpy() == y).mean() > 0.6  # three classes; the commonest holds ~38%
    np.savez(tmp_path / "wide.npz", X=x[:, :4])
    assert "has shape (400, 4); the run was trained on inputs of shape (6,)" in refused(capsys, run_dir, "wide.npz")
    np.savez(tmp_path / "other.npz", inputs=x)
    assert "has no array 'X'" in refused(capsys, run_dir, "other.npz")


def test_an_image_folder_run_predicts_on_a_folder_and_on_files(run_dlrun, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # inputs named as a user would, relative to here
    write_images(tmp_path / "pets", per_class=12, corrupt=False)
    run_dir = run_dlrun("dataset=image_folder", f"dataset.root={tmp_path / 'pets'}", "dataset.size=16", "model=cnn",
                        "trainer.max_epochs=5", "optim.lr=0.003").run_dir
    new = write_images(tmp_path / "new", per_class=3, corrupt=False)
    code, printed = predict(capsys, run_dir, tmp_path / "new")
    assert code == 0, printed
    predicted = pd.read_csv(run_dir / "predictions.csv")
    assert list(predicted.columns) == ["id", "predicted", "probability_cats", "probability_dogs"]
    assert predicted["id"].tolist() == [str(p.relative_to(tmp_path / "new")) for p in sorted(new)]
    truth = predicted["id"].str.split("/").str[0]
    assert (predicted["predicted"] == truth).mean() >= 5 / 6
    code, printed = predict(capsys, run_dir, new[0], new[-1], "--out", tmp_path / "two.csv")
    assert code == 0, printed
    assert pd.read_csv(tmp_path / "two.csv")["id"].tolist() == [new[0].name, new[-1].name]
    (tmp_path / "broken.png").write_bytes(b"not a PNG at all")
    assert "broken.png cannot be decoded" in refused(capsys, run_dir, "broken.png")


def test_digits_predicts_on_an_npz_of_x_and_a_run_without_checkpoint_is_refused(run_dlrun, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # inputs named as a user would, relative to here
    from sklearn.datasets import load_digits

    run_dir = run_dlrun("dataset=digits", "model=mlp", "trainer.max_epochs=3").run_dir
    digits = load_digits()
    np.savez(tmp_path / "digits.npz", X=digits.images[:300, None].astype(np.float32))
    code, printed = predict(capsys, run_dir, tmp_path / "digits.npz", "--checkpoint", "last")
    assert code == 0, printed
    predicted = pd.read_csv(run_dir / "predictions.csv")
    assert len(predicted) == 300 and list(predicted.columns[:2]) == ["id", "predicted"]
    assert (predicted["predicted"].to_numpy() == digits.target[:300]).mean() > 0.8
    np.savez(tmp_path / "flat.npz", X=digits.data[:10])
    assert "X must be (N, 1, 8, 8)" in refused(capsys, run_dir, "flat.npz")
    # the run directory's config is untrusted input: a class dlrun's configs do not name is never built
    foreign = tmp_path / "foreign"
    shutil.copytree(run_dir, foreign)
    cfg = yaml.safe_load((foreign / "config.yaml").read_text())
    cfg["dataset"] = {"_target_": "shutil.copyfile", "src": "/etc/hostname", "dst": str(tmp_path / "pwned")}
    (foreign / "config.yaml").write_text(yaml.safe_dump(cfg))
    panel = refused(capsys, foreign, "digits.npz")
    assert "dataset._target_ = shutil.copyfile" in panel and "dlrun-predict --trust" in panel, panel
    assert not (tmp_path / "pwned").exists()
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    shutil.rmtree(bare / "checkpoints")
    assert "has no checkpoint" in refused(capsys, bare, "digits.npz")


def test_the_console_script_is_declared():
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert 'dlrun-predict = "dlrun.predict:main"' in pyproject


@pytest.mark.slow
def test_graph_and_generative_runs_are_refused_by_the_tools_that_feed_inputs_one_by_one(run_dlrun, tmp_path, capsys):
    """A gcn reads every node of its graph at once, a VAE predicts no targets: dlrun-predict and dlrun-export
    end in a panel (exit 2) naming why, not in a traceback."""
    from dlrun.export import main as export_main

    np.savez(tmp_path / "x.npz", X=np.zeros((3, 34), dtype=np.float32))
    for args, why in ((("model=gcn", "dataset=karate"), "nodes of one graph"),
                      (("model=vae", "dataset=digits"), "inputs alone")):
        run_dir = sorted(run_dlrun(*args, "debug=fast").run_dirs)[-1]  # the newest: this model's
        assert why in refused(capsys, run_dir, tmp_path / "x.npz")
        try:
            export_main([str(run_dir), "--format", "torchscript"])
            code = 0
        except SystemExit as stop:
            code = stop.code
        printed = capsys.readouterr()
        panel = " ".join(line.strip("│ ") for line in (printed.out + printed.err).splitlines())
        assert code == 2 and why in panel and "Traceback" not in panel, panel
