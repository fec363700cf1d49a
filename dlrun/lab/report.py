"""A lab's report in its directory: `lab_report.md`, `lab_curves.png` (the learning curve of each job,
coloured by factor level) and `lab_measure.png` (the measured quantity by level: each seed, and the mean
with the standard deviation over seeds as an error bar). Drawn with matplotlib's Figure (no pyplot)."""

from __future__ import annotations

import io
import math
import statistics
from pathlib import Path

from dlrun.lab.spec import Lab
from dlrun.lab.verdict import LabJob, Verdict, format_number, mean_std, parse_quantity
from dlrun.rundir import write_atomic

REPORT_FILE = "lab_report.md"
CURVES_FILE = "lab_curves.png"
MEASURE_FILE = "lab_measure.png"


def write_report(lab: Lab, size: str, lab_dir: Path, jobs: list[LabJob], verdict: Verdict, command: str,
                 sweep: str = "") -> None:
    levels = lab.sizes[size].levels
    curves = draw_curves(lab, levels, jobs)
    measure = draw_measure(lab, levels, jobs)
    if curves is not None:
        write_atomic(lab_dir / CURVES_FILE, curves)
    if measure is not None:
        write_atomic(lab_dir / MEASURE_FILE, measure)
    columns = lab.quantities()
    lines = [
        f"# Lab `{lab.name}` ({size})", "",
        f"**Claim.** {lab.claim}", "",
        f"**Source.** {lab.source}", "",
        f"**Command.** `{command}`" + (f", which ran the sweep `dlrun {sweep}`" if sweep else ""), "",
        f"**Verdict: {verdict.outcome}.**", "",
        *(f"- {r.outcome}: {r.explain()}" for r in verdict.results), "",
        f"Each check compares per seed ({len(lab.sizes[size].seeds)} seeds: "
        f"{', '.join(map(str, lab.sizes[size].seeds))}); `in every seed` holds when all seeds pass, does not hold "
        "when none does, and is inconclusive when they disagree.", "",
        f"## {lab.factor} against the measured numbers (mean ± std over seeds)", "",
        "| " + " | ".join([lab.factor, "jobs", "statuses", *(f"`{q}`" for q in columns)]) + " |",
        "|" + "---|" * (3 + len(columns)),
    ]
    for level in levels:
        members = [job for job in jobs if job.level == level]
        statuses = ", ".join(f"{n} {s}" for s, n in _count(job.summary.status for job in members).items())
        cells = [mean_std(_values(q, members)) for q in columns]
        lines.append("| " + " | ".join([f"`{level}`", str(len(members)), statuses or "—", *cells]) + " |")
    lines += ["", "## Per seed", "", "| " + " | ".join([lab.factor, "seed", *(f"`{q}`" for q in columns)]) + " |",
              "|" + "---|" * (2 + len(columns))]
    for job in sorted(jobs, key=lambda j: (_rank(levels, j.level), j.seed)):
        cells = [format_number(parse_quantity(q)(job)) for q in columns]
        lines.append("| " + " | ".join([f"`{job.level}`", str(job.seed), *cells]) + " |")
    lines += ["", "## Figures", ""]
    if curves is not None:
        lines.append(f"![{lab.curves} by epoch, one line per job, coloured by {lab.factor}]({CURVES_FILE})")
    if measure is not None:
        lines.append(f"![{lab.measure} by {lab.factor}: seeds and mean ± std]({MEASURE_FILE})")
    lines += ["", f"The jobs' run directories are beside this file; `dlrun-summary {lab_dir}` tabulates them.", ""]
    write_atomic(lab_dir / REPORT_FILE, "\n".join(lines))


def draw_curves(lab: Lab, levels: tuple[str, ...], jobs: list[LabJob]) -> bytes | None:
    """`lab.curves` against the epoch, one line per job, one colour per level; None when nothing was logged."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    drawn = False
    for i, level in enumerate(levels):
        colour = f"C{i % 10}"
        label = f"{lab.factor}={level}"
        for job in sorted((j for j in jobs if j.level == level), key=lambda j: j.seed):
            columns = job.columns()
            epochs, values = columns.get("epoch", []), columns.get(lab.curves, [])
            points = [(e, v) for e, v in zip(epochs, values, strict=False) if math.isfinite(v) and (v > 0 or not lab.log_scale)]
            if not points:
                continue
            ax.plot(*zip(*points, strict=True), color=colour, linewidth=1.2, alpha=0.8, label=label)
            label = None  # one legend entry per level
            drawn = True
    if not drawn:
        return None
    if lab.log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(lab.curves)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(f"lab {lab.name}: {lab.curves} by {lab.factor} (one line per seed)", fontsize="medium")
    return _png(fig)


def draw_measure(lab: Lab, levels: tuple[str, ...], jobs: list[LabJob]) -> bytes | None:
    """`lab.measure` for each level: every seed as a dot, the mean with ± one standard deviation."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    drawn = False
    for x, level in enumerate(levels):
        values = [v for v in _values(lab.measure, [j for j in jobs if j.level == level]) if math.isfinite(v)]
        if not values:
            continue
        ax.scatter([x] * len(values), values, color="grey", s=14, zorder=3)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.errorbar([x], [statistics.fmean(values)], yerr=[std], fmt="o", color=f"C{x % 10}", capsize=6,
                    markersize=8, zorder=2)
        drawn = True
    if not drawn:
        return None
    if lab.log_scale:
        ax.set_yscale("log")
    ax.set_xticks(range(len(levels)), labels=list(levels))
    ax.set_xlim(-0.6, len(levels) - 0.4)
    ax.set_xlabel(lab.factor)
    ax.set_ylabel(lab.measure)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"lab {lab.name}: {lab.measure} (dots: seeds; bars: mean ± std)", fontsize="medium")
    return _png(fig)


def _values(quantity: str, jobs: list[LabJob]) -> list[float]:
    read = parse_quantity(quantity)
    return [v for v in (read(job) for job in sorted(jobs, key=lambda j: j.seed)) if v is not None]


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _rank(levels: tuple[str, ...], level: str) -> int:
    return levels.index(level) if level in levels else len(levels)


def _png(fig) -> bytes:
    image = io.BytesIO()
    fig.tight_layout()
    fig.savefig(image, format="png", dpi=90)
    return image.getvalue()
