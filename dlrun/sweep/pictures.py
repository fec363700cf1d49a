"""Pictures of a sweep, drawn from its directory alone (the jobs' summaries and metrics.csv files, and the
sweep's recorded command line), so that `dlrun-summary` can redraw them for any sweep:

    <sweep dir>/sweep_history.png      the monitored value of every job in launch order, and the best so far
    <sweep dir>/sweep_plot.png         the value against each swept key: a log axis for a key swept on a log
                                       range, one column of points per value for a categorical key (a choice,
                                       a comma list, a seed), a linear axis otherwise
    <sweep dir>/sweep_curves.png       every job's validation curve on one figure, the best bold, pruned marked
    <sweep dir>/sweep_importance.png   Optuna's parameter importances, from 8 completed jobs on

A job whose summary says `pruned` is a result, drawn as such (hollow marks, a cross where its curve was
stopped), not a failure. At the end of `dlrun -m` the pictures also go to W&B when the jobs logged there
(`upload_to_wandb`). Uses matplotlib's Figure directly (the Agg canvas), never pyplot.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dlrun.curves import read_metrics
from dlrun.rundir import write_atomic

HISTORY_FILE = "sweep_history.png"
PLOT_FILE = "sweep_plot.png"
CURVES_FILE = "sweep_curves.png"
IMPORTANCE_FILE = "sweep_importance.png"
RECORDED_SWEEP = "multirun.yaml"  # the sweep's config with its command line (Hydra's name; the launcher writes it)
MIN_TRIALS_FOR_IMPORTANCE = 8  # fewer completed jobs than this: importances would be noise
LOG, LINEAR, CATEGORICAL = "log", "linear", "categorical"
_LEGEND_JOBS = 12  # more jobs than this: no legend on the curves (the best one is named in the title)
_JITTER = 0.15  # half the width of a category's column of points


def axis_kinds(sweep_dir: Path, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, str]:
    """How to draw each swept key: LOG, LINEAR or CATEGORICAL.

    The sweep's recorded command line decides where it can: `tag(log, interval(...))` is LOG, another
    interval or a range LINEAR, a choice or comma list CATEGORICAL. `seed` is always CATEGORICAL (seeds
    are names, not quantities). A key the record does not know (no record) is CATEGORICAL when a value is
    not a number, else LINEAR (LOG for positive values spanning two decades or more).
    """
    recorded = recorded_space(Path(sweep_dir))
    kinds = {}
    for key in keys:
        values = [row["params"].get(key) for row in rows if key in row["params"]]
        if key == "seed" or not all(_is_number(v) for v in values):
            kinds[key] = CATEGORICAL
        elif key in recorded:
            kinds[key] = recorded[key]
        elif values and min(values) > 0 and max(values) / min(values) >= 100:
            kinds[key] = LOG
        else:
            kinds[key] = LINEAR
    return kinds


def recorded_space(sweep_dir: Path) -> dict[str, str]:
    """{key: LOG | LINEAR | CATEGORICAL} of the sweep overrides in `<sweep dir>/multirun.yaml` (the command line's
    `hydra.overrides.task` and a config's `hydra.sweeper.params`); empty when there is no readable record.
    The file is data from a directory (safe_load, strings parsed as overrides): nothing in it runs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException

    try:
        hydra_cfg = (yaml.safe_load((sweep_dir / RECORDED_SWEEP).read_text()) or {}).get("hydra") or {}
        lines = [str(o) for o in (hydra_cfg.get("overrides") or {}).get("task") or []]
        params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
        lines += [f"{k}={v}" for k, v in params.items()] if isinstance(params, dict) else []
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return {}
    kinds = {}
    parser = OverridesParser.create()
    for line in lines:
        try:
            override = parser.parse_override(line)
        except HydraException:
            continue
        value = override.value()
        if isinstance(value, IntervalSweep):
            kind = LOG if "log" in value.tags else LINEAR
        elif isinstance(value, RangeSweep):
            kind = LINEAR
        elif isinstance(value, ChoiceSweep):
            kind = CATEGORICAL
        else:
            continue
        kinds[override.get_key_element().lstrip("+~")] = kind
    return kinds


def draw_history(rows: Sequence[Mapping[str, Any]], monitor: str | None, mode: str) -> Any | None:
    """The value of every job with one against its job number (launch order), and the best completed value
    so far as a step line; None when no job has a value."""
    scored = [r for r in rows if _finite(r["best_value"]) and isinstance(r["job"], int)]
    if not scored:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for status, style in (("completed", {"color": "tab:blue"}), ("pruned", _PRUNED_MARK)):
        picked = [r for r in scored if _status_group(r) == status]
        if picked:
            ax.scatter([r["job"] for r in picked], [r["best_value"] for r in picked], label=status, zorder=3, **style)
    others = [r for r in scored if _status_group(r) == "other"]
    if others:
        ax.scatter([r["job"] for r in others], [r["best_value"] for r in others], marker="s", color="tab:gray",
                   label="other (interrupted, diverged, ...)", zorder=3)
    best, steps = None, []
    for r in scored:
        if r["status"] == "completed" and (best is None or _better(r["best_value"], best, mode)):
            best = r["best_value"]
        if best is not None:
            steps.append((r["job"], best))
    if steps:
        ax.step(*zip(*steps, strict=True), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("job (launch order)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(monitor or "best value")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(f"optimization history · {len(scored)} of {len(rows)} jobs with a value ({mode})", fontsize="medium")
    return fig


def draw_params(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], kinds: Mapping[str, str],
                monitor: str | None) -> Any | None:
    """The value against each swept key, one panel per key (see `axis_kinds`); None when no job has a value
    or nothing was swept."""
    scored = [r for r in rows if _finite(r["best_value"])]
    if not scored or not keys:
        return None
    import numpy as np
    from matplotlib.figure import Figure

    columns = min(len(keys), 3)
    lines = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * lines), layout="constrained")
    jitter = np.random.default_rng(0)  # the same sweep gives the same picture
    for i, key in enumerate(keys):
        ax = fig.add_subplot(lines, columns, i + 1)
        kind = kinds.get(key, LINEAR)
        categories = _categories([r["params"].get(key) for r in scored]) if kind == CATEGORICAL else []
        for group in ("completed", "pruned", "other"):
            picked = [r for r in scored if _status_group(r) == group
                      and (kind == CATEGORICAL or _is_number(r["params"].get(key)))]  # a job without the key: no point
            if not picked:
                continue
            values = [r["params"].get(key) for r in picked]
            if kind == CATEGORICAL:
                xs = [categories.index(_category(v)) + jitter.uniform(-_JITTER, _JITTER) for v in values]
            else:
                xs = values
            style = _PRUNED_MARK if group == "pruned" else {"color": "tab:blue" if group == "completed" else "tab:gray"}
            ax.scatter(xs, [r["best_value"] for r in picked], label=group, **style)
        if kind == CATEGORICAL:
            ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 4 else 0)
            ax.set_xlim(-0.5, len(categories) - 0.5)
        elif kind == LOG:
            ax.set_xscale("log")
        ax.set_xlabel(key + (" (log)" if kind == LOG else ""))
        ax.set_ylabel(monitor or "best value")
        ax.grid(alpha=0.3)
        if i == 0 and any(_status_group(r) != "completed" for r in scored):
            ax.legend(fontsize="small")
    fig.suptitle(f"{len(scored)} of {len(rows)} jobs with a value")
    return fig


def draw_curves(sweep_dir: Path, rows: Sequence[Mapping[str, Any]], monitor: str | None, mode: str = "min",
                keys: Sequence[str] = ()) -> Any | None:
    """Every job's validation curve of the monitored metric (val/loss when the sweep monitors a training metric)
    against the epoch on one figure: the best job bold, jobs that did not complete dashed, pruned jobs dotted
    with a cross at the epoch where they were stopped; each named by its values of the swept `keys` (all its
    overrides without). None when no job logged an epoch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from dlrun.console import show_value

    metric = monitor if monitor and monitor.startswith("val/") else "val/loss"
    curves = []
    for job in rows:
        columns = read_metrics(Path(sweep_dir) / str(job["dir"]) / "metrics.csv")
        if columns.get("epoch") and metric in columns:
            kept = [(e, v) for e, v in zip(columns["epoch"], columns[metric], strict=True) if not math.isnan(v)]
            if kept:
                curves.append((job, *zip(*kept, strict=True)))
    if not curves:
        return None
    scored = [job for job, _, _ in curves if job["status"] == "completed" and _finite(job.get("best_value"))]
    best = (min if mode == "min" else max)(scored, key=lambda job: job["best_value"]) if scored else None
    legend = len(curves) <= _LEGEND_JOBS
    fig = Figure(figsize=(10.0 if legend else 7.5, 4.2))
    fig.subplots_adjust(left=0.08, right=0.6 if legend else 0.97, bottom=0.12, top=0.88)
    ax = fig.add_subplot(1, 1, 1)
    pruned = 0
    for job, epochs, values in curves:
        swept = " ".join(f"{k}={show_value(job['params'].get(k))}" for k in keys) if keys else job.get("overrides")
        label = f"job {job['job']}: {swept or '(no overrides)'}"[:48]
        group = _status_group(job)
        line = ax.plot(epochs, values, label=label + (" (pruned)" if group == "pruned" else ""),
                       linewidth=2.4 if job is best else 1.0, alpha=1.0 if job is best else 0.75,
                       linestyle={"completed": "-", "pruned": ":"}.get(group, "--"),
                       marker="." if len(epochs) < 30 else None)[0]
        if group == "pruned":
            pruned += 1
            ax.plot(epochs[-1], values[-1], marker="x", markersize=8, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    title = f"{len(curves)} jobs" + (f" ({pruned} pruned: ×)" if pruned else "") + f" · {metric}"
    if best is not None:
        title += f" · best: job {best['job']} ({monitor} = {best['best_value']:.4g})"
    fig.suptitle(title, fontsize="medium")
    return fig


def param_importances(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], kinds: Mapping[str, str],
                      mode: str) -> tuple[str, dict[str, float]] | None:
    """(evaluator, {key: importance}) by Optuna's importance evaluators, most important first, over the completed
    jobs; None with fewer than MIN_TRIALS_FOR_IMPORTANCE of them, or when no key took two values among them.

    The study is built in memory from the summaries: one COMPLETE trial per job, with distributions inferred
    from the values seen (log or uniform floats over their range, categorical choices); the same calls work
    on Optuna 2.10 and Optuna >= 3 (FloatDistribution replaced the Uniform distributions). fANOVA, Optuna's
    default, comes first; Optuna 2.10's fANOVA fails on current scikit-learn's trees, and mean decrease in
    impurity (a random forest's own importances) takes its place.
    """
    completed = [r for r in rows if r["status"] == "completed" and _finite(r["best_value"])]
    if len(completed) < MIN_TRIALS_FOR_IMPORTANCE:
        return None
    distributions = {}
    for key in keys:
        values = [r["params"].get(key) for r in completed]
        if len({repr(v) for v in values}) < 2:
            continue
        if kinds.get(key) != CATEGORICAL and all(_is_number(v) for v in values):
            distributions[key] = _float_distribution(min(values), max(values), log=kinds.get(key) == LOG)
        else:
            distributions[key] = _categorical_distribution(values)
    if not distributions:
        return None
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # create_trial and add_trials are "experimental" in Optuna 2
            study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
            study.add_trials([
                optuna.trial.create_trial(
                    params={k: _choice(r["params"].get(k), d) for k, d in distributions.items()},
                    distributions=distributions, value=r["best_value"], state=optuna.trial.TrialState.COMPLETE)
                for r in completed
            ])
            for name, evaluator in (("fANOVA", optuna.importance.FanovaImportanceEvaluator),
                                    ("mean decrease in impurity", optuna.importance.MeanDecreaseImpurityImportanceEvaluator)):
                try:
                    importances = optuna.importance.get_param_importances(study, evaluator=evaluator(seed=0))
                except (ValueError, TypeError, RuntimeError, ImportError):
                    continue
                return name, {k: float(v) for k, v in importances.items()}
            return None
    finally:
        optuna.logging.set_verbosity(verbosity)


def draw_importances(evaluator: str, importances: Mapping[str, float], n_trials: int) -> Any:
    """Horizontal bars, the most important key on top."""
    from matplotlib.figure import Figure

    keys = list(importances)[::-1]
    fig = Figure(figsize=(6.0, 1.2 + 0.45 * len(keys)), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(keys, [importances[k] for k in keys], color="tab:blue")
    for y, key in enumerate(keys):
        ax.text(importances[key], y, f" {importances[key]:.2f}", va="center", fontsize="small")
    ax.set_xlim(0, 1.1)
    ax.set_xlabel(f"importance ({evaluator}, sums to 1)")
    fig.suptitle(f"parameter importances over {n_trials} completed jobs", fontsize="medium")
    return fig


def write_pictures(sweep_dir: Path, rows: Sequence[Mapping[str, Any]], keys: Sequence[str], monitor: str | None,
                   mode: str) -> list[Path]:
    """Draw every picture there is something for into the sweep directory; return the files written."""
    sweep_dir = Path(sweep_dir)
    kinds = axis_kinds(sweep_dir, rows, keys)
    importances = param_importances(rows, keys, kinds, mode)
    figures = {
        HISTORY_FILE: draw_history(rows, monitor, mode),
        PLOT_FILE: draw_params(rows, keys, kinds, monitor),
        CURVES_FILE: draw_curves(sweep_dir, rows, monitor, mode, keys),
        IMPORTANCE_FILE: draw_importances(*importances, sum(r["status"] == "completed" for r in rows))
        if importances else None,
    }
    written = []
    for name, fig in figures.items():
        if fig is not None:
            image = io.BytesIO()
            fig.savefig(image, format="png", dpi=90)
            write_atomic(sweep_dir / name, image.getvalue())  # like every result file: never half written
            written.append(sweep_dir / name)
    return written


def wandb_settings(sweep_dir: Path, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The `logger.wandb` settings of the sweep's jobs (the first job's resolved config.yaml that has them),
    or None when the jobs did not log to W&B or it was disabled."""
    import os

    for row in rows:
        try:
            config = yaml.safe_load((Path(sweep_dir) / str(row["dir"]) / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        loggers = config.get("logger") if isinstance(config, dict) else None
        if isinstance(loggers, dict) and isinstance(loggers.get("wandb"), dict):
            settings = loggers["wandb"]
            disabled = (settings.get("mode") or os.environ.get("WANDB_MODE")) == "disabled"
            return None if disabled else settings
    return None


def upload_to_wandb(sweep_dir: Path, pictures: Sequence[Path], rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Log the pictures to one W&B run of the sweep's group (job_type `sweep`, in `<sweep dir>/wandb/`), in
    the jobs' project and mode; the run's path (or offline directory), or None when W&B is off for this sweep.
    W&B failing is a warning: the pictures are in the sweep directory anyway."""
    settings = wandb_settings(sweep_dir, rows)
    if settings is None or not pictures:
        return None
    from collections import Counter

    from dlrun.console import console

    try:
        import wandb

        from dlrun.tracking import resolve_mode  # imports Lightning: only for a sweep that logs to W&B

        run = wandb.init(
            project=settings.get("project") or "dlrun", entity=settings.get("entity"),
            group=settings.get("group") or Path(sweep_dir).name, name=f"{Path(sweep_dir).name} · sweep",
            job_type="sweep", dir=str(sweep_dir), mode=resolve_mode(settings.get("mode")),
            config={"sweep_dir": str(Path(sweep_dir).absolute())}, settings=wandb.Settings(silent=True),
        )
        run.log({path.stem: wandb.Image(str(path)) for path in pictures})
        run.summary.update({f"jobs/{status}": n for status, n in Counter(r["status"] for r in rows).items()})
        where = str(Path(run.dir).parent) if run.offline else run.url
        run.finish()
        return where
    except Exception as err:  # W&B's own errors are many and varied: none of them may end the summary
        console.print(f"[yellow]W&B could not take the sweep's pictures ({type(err).__name__}: {err}); "
                      f"they are in {sweep_dir}.[/yellow]", highlight=False)
        return None


_PRUNED_MARK = {"facecolors": "none", "edgecolors": "tab:orange", "marker": "o"}


def _status_group(row: Mapping[str, Any]) -> str:
    """completed, pruned (read from the summary whether or not this dlrun knows the status), or other."""
    status = row.get("status")
    return status if status in ("completed", "pruned") else "other"


def _category(value: Any) -> str:
    return str(value)


def _categories(values: Sequence[Any]) -> list[str]:
    """Category labels in order: numbers by value (seeds 0, 1, 2, 10), then the rest alphabetically."""
    numbers = sorted({v for v in values if _is_number(v)})
    words = sorted({str(v) for v in values if not _is_number(v)})
    return list(dict.fromkeys([*map(_category, numbers), *words]))


def _float_distribution(low: float, high: float, log: bool) -> Any:
    from optuna import distributions

    if hasattr(distributions, "FloatDistribution"):  # Optuna >= 3
        return distributions.FloatDistribution(float(low), float(high), log=log)
    kind = distributions.LogUniformDistribution if log else distributions.UniformDistribution
    return kind(float(low), float(high))


def _categorical_distribution(values: Sequence[Any]) -> Any:
    from optuna.distributions import CategoricalDistribution

    return CategoricalDistribution(_categories(values))


def _choice(value: Any, distribution: Any) -> Any:
    """A job's value as its trial's parameter: the category label for a categorical key, a float otherwise."""
    from optuna.distributions import CategoricalDistribution

    return _category(value) if isinstance(distribution, CategoricalDistribution) else float(value)


def _better(value: float, best: float, mode: str) -> bool:
    return value > best if mode == "max" else value < best


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)
