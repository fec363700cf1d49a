"""Fuzzing (issue 17): generated command lines and corrupted run and sweep directories, given to the real
`dlrun`, `dlrun-eval` and `dlrun-summary`, must end with exit 0 or 2 and never print a traceback; a
corrupted directory must never lose or overwrite a completed result.

Hypothesis draws the cases with a fixed seed (`derandomize=True`) and a bounded count, so CI runs the same
cases every time in a few minutes. Each drawn example is a batch of cases run two at a time; every case's
outcome is checked, and the test fails listing every case that broke the rule, not only the first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from dlrun import CONF_DIR
from tests.conftest import DLRUN, run_process

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DLRUN_EVAL = [sys.executable, "-m", "dlrun.evaluate"]
DLRUN_SUMMARY = [sys.executable, "-m", "dlrun.sweep.summary"]
QUIET = ("print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false")
TRACEBACK = "Traceback (most recent call last)"
CASE_TIMEOUT = 180  # a generated value that is valid may train: debug=fast keeps it short, this bounds it
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=6,
                suppress_health_check=list(HealthCheck))

pytestmark = pytest.mark.slow


def _env(out: Path) -> dict[str, str]:
    env = {**os.environ, "DLRUN_OUTPUT_DIR": str(out), "COLUMNS": "120"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("DLRUN_TRUST_RUN_CONFIGS", None)
    return env


def _run_all(commands: list[list[str]], out: Path) -> list[tuple[list[str], int | str, str]]:
    """(command, exit code or 'timeout', output) of each command, two at a time."""

    def run(command: list[str]) -> tuple[list[str], int | str, str]:
        try:
            proc = run_process(command, env=_env(out), cwd=out.parent, timeout=CASE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return command, "timeout", ""
        return command, proc.returncode, proc.stdout + proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(run, commands))


def _broke_the_rule(outcome: tuple[list[str], int | str, str]) -> str | None:
    command, code, output = outcome
    if code == "timeout":  # a valid configuration that trains longer than debug=fast: not an error
        return None
    if code not in (0, 2) or TRACEBACK in output:
        last = [line for line in output.strip().splitlines() if line.strip()][-3:]
        return f"exit {code}: {' '.join(command[2:])}\n    " + "\n    ".join(last)
    return None


def _report(name: str, outcomes: list, problems: list[str]) -> None:
    """Counts for the closing note (pytest -s shows them); the test fails with every problem listed."""
    print(f"\n{name}: {len(outcomes)} generated cases, {len(problems)} broke the rule")
    assert not problems, "\n".join(problems)


# --- (a) command lines from the config schema -------------------------------------------------------------


def _schema() -> dict[str, object]:
    """{dotted key: default} of every leaf of dlrun's default composed config (where users type values)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="config"), resolve=False)

    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, f"{prefix}.{key}" if prefix else key)
        else:
            yield prefix, node

    skipped = ("paths.", "resume", "sweep.resume", "print_config", "hydra")  # where outputs go; the tests' own
    return {k: v for k, v in leaves(cfg) if not k.startswith(skipped)}


SCHEMA = _schema()
GROUPS = sorted({k.split(".")[0] for k in SCHEMA if "." in k})
# Values of the wrong type, out of every range, and the edges of numbers (as typed on a command line).
BAD_VALUES = ["abc", "''", "-1", "0", "-1e30", "1e308", "nan", "inf", "-inf", str(2**64), str(2**32), "4294967296",
              "1.5", "true", "null", "[]", "[1,2]", "'[a]'", "{a:1}", "-0.5", "0.999999", "1000000000"]
_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@st.composite
def _override(draw) -> str:
    kind = draw(st.sampled_from(["known", "known", "known", "unknown", "plus", "plus-top", "delete"]))
    value = draw(st.sampled_from(BAD_VALUES))
    if kind == "known":
        return f"{draw(st.sampled_from(sorted(SCHEMA)))}={value}"
    if kind == "unknown":
        return f"{draw(st.sampled_from(GROUPS))}.{draw(_name)}x={value}"
    if kind == "plus":
        return f"+{draw(st.sampled_from(GROUPS))}.{draw(_name)}={value}"
    if kind == "plus-top":
        return f"+{draw(_name)}_knob={value}"
    return f"~{draw(st.sampled_from(sorted(SCHEMA)))}"


def test_generated_command_lines_end_with_exit_0_or_2(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz_cli") / "out"
    out.mkdir()
    outcomes, problems = [], []

    @FUZZ
    @given(st.lists(st.lists(_override(), min_size=1, max_size=3), min_size=6, max_size=6))
    def batch(command_lines: list[list[str]]) -> None:
        results = _run_all([[*DLRUN, *QUIET, "debug=fast", *line] for line in command_lines], out)
        outcomes.extend(results)
        problems.extend(p for p in map(_broke_the_rule, results) if p)

    batch()
    _report("command lines", outcomes, problems)


# --- (b) corrupted run and sweep directories ----------------------------------------------------------------


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """A completed run and a completed sweep of two jobs, trained once."""
    out = tmp_path_factory.mktemp("fuzz_dirs") / "out"
    small = (*QUIET, "debug=fast", "dataset=xor", "model=logreg")
    for args in (small, ("-m", *small, "seed=0,1")):
        proc = run_process([*DLRUN, *args], env=_env(out), cwd=out.parent, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_config,) = (out / "runs").glob("*/*/config.yaml")
    (sweep,) = (out / "sweeps").iterdir()
    return {"run": run_config.parent, "sweep": sweep}


def _leaf_keys(cfg, prefix=""):
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            yield from _leaf_keys(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix


def _corrupt(run_dir: Path, how: str, rng_bytes: bytes, cut: float, key_index: int, value: str) -> None:
    """One corruption of the kind `how`, at a place chosen by the drawn numbers."""
    summary, config = run_dir / "summary.json", run_dir / "config.yaml"
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
    if how == "truncate-summary" and summary.exists():
        text = summary.read_bytes()
        summary.write_bytes(text[: int(len(text) * cut)])
    elif how == "garbage-summary":
        summary.write_bytes(rng_bytes)
    elif how == "status" and summary.exists():
        try:
            data = json.loads(summary.read_text())
            data["status"] = value
            summary.write_text(json.dumps(data))
        except ValueError:
            pass
    elif how == "delete-checkpoint" and checkpoints:
        checkpoints[key_index % len(checkpoints)].unlink()
    elif how == "garbage-checkpoint" and checkpoints:
        path = checkpoints[key_index % len(checkpoints)]
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)] if key_index % 2 else rng_bytes)
    elif how == "edit-config" and config.exists():
        try:
            cfg = yaml.safe_load(config.read_text())
        except yaml.YAMLError:
            return
        keys = list(_leaf_keys(cfg))
        if keys:
            *parents, last = keys[key_index % len(keys)].split(".")
            node = cfg
            for part in parents:
                node = node[part]
            node[last] = yaml.safe_load(value) if value not in ("", "''") else ""
            config.write_text(yaml.safe_dump(cfg))
    elif how == "drop-config-section" and config.exists():
        try:
            cfg = yaml.safe_load(config.read_text())
            cfg.pop(sorted(cfg)[key_index % len(cfg)])
            config.write_text(yaml.safe_dump(cfg))
        except (yaml.YAMLError, AttributeError, TypeError, ValueError, ZeroDivisionError):
            pass
    elif how == "garbage-config":
        config.write_bytes(rng_bytes)
    elif how == "move-checkpoints" and (run_dir / "checkpoints").is_dir():
        (run_dir / "checkpoints").rename(run_dir / "ckpts_moved")
    elif how == "move-hydra" and (run_dir / ".hydra").is_dir():
        (run_dir / ".hydra").rename(run_dir / "hydra_moved")
    elif how == "move-directory":
        run_dir.rename(run_dir.with_name(run_dir.name + "_moved"))


CORRUPTIONS = ["truncate-summary", "garbage-summary", "status", "delete-checkpoint", "garbage-checkpoint",
               "edit-config", "drop-config-section", "garbage-config", "move-checkpoints", "move-hydra",
               "move-directory"]
_STATUSES = ["completed", "running", "failed", "interrupted", "diverged", "pruned", "bogus", "null"]


def _completed_results(root: Path) -> dict[str, str]:
    """{path: sha256} of the result files of every directory under `root` whose summary says completed."""
    found = {}
    for summary in [root / "summary.json", *root.glob("*/summary.json")]:
        try:
            completed = json.loads(summary.read_text()).get("status") == "completed"
        except (OSError, ValueError, AttributeError):
            continue
        if completed:
            for path in [summary, summary.parent / "config.yaml", *summary.parent.glob("checkpoints/*.ckpt")]:
                if path.is_file():
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_corrupted_directories_end_with_exit_0_or_2_and_keep_completed_results(originals, tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz_corrupt")
    out = base / "out"
    out.mkdir()
    outcomes, problems = [], []
    counter = iter(range(10**6))

    corruption = st.tuples(st.sampled_from(CORRUPTIONS), st.binary(max_size=64), st.floats(0, 1),
                           st.integers(0, 100), st.sampled_from(_STATUSES + ["abc", "[]", "-1", "''"]))

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(["resume", "eval", "summary", "eval-sweep"]),
                              st.lists(corruption, min_size=1, max_size=3)), min_size=4, max_size=4))
    def batch(cases) -> None:
        commands, before = [], []
        for tool, corruptions in cases:
            place = base / f"case{next(counter)}"
            source = originals["sweep" if tool in ("summary", "eval-sweep") else "run"]
            shutil.copytree(source, place)
            targets = sorted(p.parent for p in place.glob("*/summary.json")) or [place]
            for how, junk, cut, index, value in corruptions:
                target = targets[index % len(targets)]
                if target.exists():
                    _corrupt(target, how, junk, cut, index, value)
            before.append(_completed_results(place))
            commands.append({"resume": [*DLRUN, f"resume={place}"], "eval": [*DLRUN_EVAL, str(place)],
                             "summary": [*DLRUN_SUMMARY, str(place)], "eval-sweep": [*DLRUN_EVAL, str(place)]}[tool])
        results = _run_all(commands, out)
        outcomes.extend(results)
        problems.extend(p for p in map(_broke_the_rule, results) if p)
        for kept, (command, _, _) in zip(before, results, strict=True):
            after = {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else None
                     for path in kept}
            changed = [path for path in kept if after[path] != kept[path]]
            if changed:
                problems.append(f"{' '.join(command[2:])} lost or changed completed results: {changed}")

    batch()
    _report("corrupted directories", outcomes, problems)


# --- (c) catalog combinations: every configuration that validates trains -----------------------------------
FILE_FREE_DATASETS = ["adding", "blobs", "breast_cancer", "circles", "copy", "digits", "iris", "moons", "parity",
                      "ravine", "sine", "sine_seq", "spirals", "wine", "xor"]  # the others read files
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
REGULARIZERS = sorted(p.stem for p in (CONF_DIR / "regularizer").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (CONF_DIR / "optim").glob("*.yaml"))


@st.composite
def _combination(draw) -> list[str]:
    regularizers = draw(st.lists(st.sampled_from(REGULARIZERS), min_size=1, max_size=2, unique=True))
    return [f"model={draw(st.sampled_from(MODELS))}", f"dataset={draw(st.sampled_from(FILE_FREE_DATASETS))}",
            f"regularizer=[{','.join(regularizers)}]", f"optim={draw(st.sampled_from(OPTIMIZERS))}",
            f"dataset.batch_size={draw(st.sampled_from([1, 2, 3, 7, 12, 64]))}"]


def test_catalog_combinations_train_a_step_or_are_refused(tmp_path_factory):
    """model x data set x regularizers x batch size x optimizer, drawn from the catalog: a combination either
    trains (summary.json says completed, or diverged: a result) or is refused before training with exit 2."""
    out = tmp_path_factory.mktemp("fuzz_combinations") / "out"
    out.mkdir()
    outcomes, problems = [], []

    @FUZZ
    @given(st.lists(_combination(), min_size=6, max_size=6))
    def batch(combinations: list[list[str]]) -> None:
        results = _run_all([[*DLRUN, *QUIET, "debug=fast", *combination] for combination in combinations], out)
        outcomes.extend(results)
        problems.extend(p for p in map(_broke_the_rule, results) if p)
        problems.extend(f"exit 0 without a trained run: {' '.join(command[2:])}" for command, code, output in results
                        if code == 0 and not any(s in output for s in ("dlrun · completed", "dlrun · diverged")))

    batch()
    _report("catalog combinations", outcomes, problems)
