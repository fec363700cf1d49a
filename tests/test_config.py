"""Knob rules beside their options (conf/<group>/<option>.yaml), read by dlrun/config.py, and callbacks
added from a user's own config: the rules every option declares, per-component ranges, refused keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from dlrun import CONF_DIR
from dlrun.config import LIST_GROUPS, SINGLE_GROUPS, Catalog, find_problems, parse_rule
from dlrun.errors import UserError


def problems(*overrides: str, search_path: Path | None = None) -> list[str]:
    """find_problems as `dlrun` calls it: with Hydra's choices and config sources."""
    if search_path is not None:
        overrides = (f"hydra.searchpath=[file://{search_path}]", *overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    hydra = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    return find_problems(cfg, hydra)


# --- the rules as written ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "good", "bad", "described"),
    [
        ("int >= 1", [1, 7], [0, 1.5, True, "3", None], "an integer >= 1"),
        ("float in [0, 1)", [0, 0.5], [1, -0.1, float("nan")], "a number in [0, 1)"),
        ("float > 0 | null", [1e-9, None], [0, "a"], "a number > 0 (or null)"),
        ("relu | tanh", ["relu", "tanh"], ["gelu", 1], "one of relu, tanh"),
        ("auto | int >= 1", ["auto", 4], [0, "4"], "auto or an integer >= 1"),
        ("32-true | 32", ["32-true", 32], ["16", 16], "one of 32-true, 32"),
        ("list of 2 float in [0, 1)", [[0.9, 0.999]], [[0.9], 0.9, [0.9, 1.0]], "a list of 2 numbers in [0, 1)"),
        ("int >= 1 | list of int >= 1", [3, [3, 4]], [[], [0], 0], "an integer >= 1 or a list of integers >= 1"),
        ("int in [0, 4294967295]", [0, 2**32 - 1], [-1, 2**32], "an integer in [0, 4294967295]"),
    ],
)
def test_a_written_rule_accepts_what_it_says(text, good, bad, described):
    rule = parse_rule(text)
    assert all(rule.accepts(v) for v in good), [v for v in good if not rule.accepts(v)]
    assert not any(rule.accepts(v) for v in bad), [v for v in bad if rule.accepts(v)]
    assert rule.describe() == described


@pytest.mark.parametrize("text", ["integer >= 1", "int >= ", "str > 3", "float in [0 1]", "two words"])
def test_an_unreadable_rule_is_refused(text):
    with pytest.raises(ValueError):
        parse_rule(text)


def test_every_option_in_conf_declares_a_rule_for_every_knob():
    """Walks conf/: every option file parses, and each of its knobs (shared dataset keys included) has a rule."""
    catalog = Catalog([CONF_DIR])
    assert catalog.top and all(catalog.top.values()) and catalog.shared and all(catalog.shared.values())
    seen = 0
    for group in (*SINGLE_GROUPS, *LIST_GROUPS):
        for name in catalog.names(group):
            option = catalog.option(group, name)
            assert option is not None, f"{group}={name}"
            unruled = [k for k, rule in option.knobs.items() if rule is None]
            assert not unruled, f"{group}={name}: knobs without a rule: {unruled}"
            seen += len(option.knobs)
    assert seen > 200


@pytest.mark.parametrize("group", [g for g in SINGLE_GROUPS if g not in ("paths",)])
def test_every_option_passes_its_own_rules(group):
    for name in Catalog([CONF_DIR]).names(group):
        assert problems(f"{group}={name}") == [], f"{group}={name}"


def test_list_group_options_pass_their_own_rules():
    assert problems("regularizer=[augment,dropout,elastic,grad_clip,input_noise,l1,l2,label_smoothing,max_norm,"
                    "weight_noise]", "logger=[csv,tensorboard,wandb]") == []


# --- ranges per component ------------------------------------------------------------------------------
def test_a_knob_has_its_own_components_range():
    """hidden is a state size for an LSTM (>= 1), an optional layer for a CNN (0: none)."""
    assert problems("model=lstm", "model.hidden=0") == ["model.hidden = 0: expected an integer >= 1 (model=lstm)"]
    assert problems("model=cnn", "model.hidden=0") == []
    assert problems("model=mlp", "model.width=0") == [
        "model.width = 0: expected an integer >= 1 or a list of integers >= 1 (model=mlp)"]


def test_recurrent_hidden_zero_is_refused_before_torch_loads(run_dlrun):
    result = run_dlrun("model=lstm", "model.hidden=0", check=False)
    assert result.returncode == 2
    assert "model.hidden = 0" in result.stderr and "model=lstm" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.run_dirs == []  # refused before the run wrote anything


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("+model.my_knob=1", ["model.my_knob: model=mlp has no knob 'my_knob'", "width, depth, activation"]),
        ("+optim.lrr=0.1", ["optim.lrr: optim=adam has no knob 'lrr' (did you mean 'lr'?)", "lr, betas, eps"]),
    ],
)
def test_a_key_no_option_declares_is_refused_with_the_options_knobs(run_dlrun, override, says):
    result = run_dlrun(override, check=False)
    assert result.returncode == 2
    text = " ".join((result.stdout + result.stderr).split())  # the panel wraps lines
    assert all(s in text for s in says), text
    assert "Traceback" not in text


def test_unknown_keys_are_refused_in_list_groups_and_nested_entries():
    assert problems("regularizer=[l2,dropout]", "+regularizer.l2.x=1") == [
        "regularizer.l2.x: regularizer=l2 has no knob 'x'; its knobs: alpha"]
    [problem] = problems("+callbacks.early_stopping.patiense=3")
    assert problem.startswith("callbacks.early_stopping.patiense: callbacks=default has no knob")
    assert "did you mean 'early_stopping.patience'?" in problem


def test_a_class_of_your_own_takes_knobs_of_its_own():
    """Pointing _target_ at another class: its extra knobs are its business; the option's still have rules."""
    assert problems("model._target_=my_pkg.Net", "+model.crash_after=4") == []
    assert problems("model._target_=my_pkg.Net", "model.width=0") != []


def test_options_extend_their_parents_rules():
    """callbacks=no_early_stopping extends default: its knobs and rules are default's."""
    assert problems("callbacks=no_early_stopping", "callbacks.early_stopping.patience=-1") == [
        "callbacks.early_stopping.patience = -1: expected an integer >= 0 (callbacks=no_early_stopping)"]


def test_seeds_stay_within_numpys_range_and_counts_within_int64():
    assert problems("seed=4294967295", "dataset.split_seed=4294967295") == []
    assert problems("seed=4294967296", "dataset.split_seed=-1") == [
        "seed = 4294967296: expected an integer in [0, 4294967295]",
        "dataset.split_seed = -1: expected an integer in [0, 4294967295] (or null) (dataset=digits)",
    ]
    [problem] = problems("dataset=moons", "dataset.n_samples=99999999999999999999")
    assert "too large for the 64-bit integers" in problem
    assert problems("dataset.val_fraction=-0.1") == [
        "dataset.val_fraction = -0.1: expected a number in [0, 1) (dataset=digits)"]
    assert problems("dataset.val_fraction=0") == []  # no validation split: training on all the training data


def test_without_hydras_choices_the_option_is_recognized_by_its_class_and_keys(compose_cfg):
    """dlrun-eval and the tests validate configs without Hydra's choices."""
    assert find_problems(compose_cfg("model=lstm", "model.hidden=0")) == [
        "model.hidden = 0: expected an integer >= 1 (model=lstm)"]
    assert find_problems(compose_cfg("optim=sgd", "+optim.lrr=1"))[0].startswith("optim.lrr: optim=sgd has no knob")


# --- a user's own options ----------------------------------------------------------------------------
def test_a_users_option_declares_its_knobs_the_same_way(run_dlrun, tmp_path):
    model = tmp_path / "my_conf" / "model"
    model.mkdir(parents=True)
    (model / "tiny.yaml").write_text("# my own tiny MLP\n_target_: dlrun.models.mlp.MLP\n"
                                     "width: 8     # [int >= 4] at least 4 units\ndepth: 1\n")
    conf = tmp_path / "my_conf"
    assert problems("model=tiny", "model.width=2", search_path=conf) == [
        "model.width = 2: expected an integer >= 4 (model=tiny)"]
    assert problems("model=tiny", "model.depth=-5", search_path=conf) == []  # not annotated: any value
    [problem] = problems("model=tiny", "+model.widht=5", search_path=conf)
    assert problem == "model.widht: model=tiny has no knob 'widht' (did you mean 'width'?); its knobs: width, depth"

    result = run_dlrun(f"hydra.searchpath=[file://{conf}]", "model=tiny", "model.width=2", check=False)
    assert result.returncode == 2 and "expected an integer >= 4 (model=tiny)" in " ".join(result.stderr.split())


def test_a_malformed_rule_in_a_users_file_is_a_clean_error(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "bad.yaml").write_text("_target_: dlrun.models.mlp.MLP\nwidth: 8   # [integer >= 4]\n")
    with pytest.raises(UserError, match=r"bad.yaml:2: cannot read"):
        Catalog([tmp_path]).option("model", "bad")


USER_CALLBACK = '''
from pathlib import Path

import pytorch_lightning as pl


class WriteAtFitEnd(pl.Callback):
    """Writes the epoch count reached and the run's monitor to `path` when fitting ends."""

    def __init__(self, path: str, monitor: str):
        self.path, self.monitor = Path(path), monitor

    def on_fit_end(self, trainer, pl_module):
        self.path.write_text(f"{trainer.current_epoch} {self.monitor}")
'''


def test_a_users_callback_from_a_config_directory(run_dlrun, tmp_path):
    """A callback class of one's own, added by YAML: an option of the callbacks group that extends dlrun's."""
    (tmp_path / "my_callbacks.py").write_text(USER_CALLBACK)
    callbacks = tmp_path / "my_conf" / "callbacks"
    callbacks.mkdir(parents=True)
    (callbacks / "with_mine.yaml").write_text(
        "# dlrun's callbacks, plus mine\ndefaults:\n  - default\nfit_end:\n  _target_: my_callbacks.WriteAtFitEnd\n"
        "  path: ${hydra:runtime.output_dir}/fit_end.txt   # [str] where the note goes\n"
    )
    result = run_dlrun(f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "callbacks=with_mine", "debug=fast",
                       "trainer.max_epochs=2", env={"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))})
    assert result.summary()["status"] == "completed"
    assert (result.run_dir / "fit_end.txt").read_text() == "2 val/loss"  # got the run's monitor by its name
    assert (result.run_dir / "checkpoints" / "best.ckpt").exists()  # dlrun's own callbacks still there


def test_a_removed_knob_is_refused_naming_its_option():
    """`~key` deletes a knob the component needs: found by the fuzzer as a traceback from build_trainer."""
    assert problems("~trainer.limit_val_batches", "~dataset.batch_size", "~seed") == [
        "dataset.batch_size: dataset=digits needs this knob; it was removed (~dataset.batch_size)",
        "trainer.limit_val_batches: trainer=default needs this knob; it was removed (~trainer.limit_val_batches)",
        "seed: a top-level key of every config; it was removed (~seed)",
    ]
    assert problems("logger=mlflow", "debug=profile") == []  # an empty mapping and an object knob are present
