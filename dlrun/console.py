"""Everything rich: the config tree, result tables and error panels. No torch here: errors render fast."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from dlrun.errors import UserError
from dlrun.metrics import ordered
from dlrun.run_summary import RunSummary

console = Console()
err_console = Console(stderr=True)

# Groups shown first in the config tree, in the order a reader thinks about an experiment.
_TREE_ORDER = ("dataset", "model", "optim", "scheduler", "regularizer", "trainer", "hardware", "callbacks")


def print_config_tree(cfg: DictConfig, choices: Mapping[str, Any] | None = None) -> None:
    """The composed config as a tree, one branch per group, labelled with the chosen option."""
    tree = Tree("[bold]config[/bold]")
    keys = [k for k in _TREE_ORDER if k in cfg] + [k for k in cfg if k not in _TREE_ORDER]
    for key in keys:
        node = cfg[key]
        choice = (choices or {}).get(key)
        label = f"[bold cyan]{key}[/bold cyan]" + (f" [dim]= {choice}[/dim]" if choice else "")
        if isinstance(node, DictConfig):
            branch = tree.add(label)
            body = OmegaConf.to_yaml(node, resolve=True).rstrip()
            if body and body != "{}":
                branch.add(Text(body, style="white"))
        else:
            value = OmegaConf.to_container(node, resolve=True) if isinstance(node, ListConfig) else node
            tree.add(f"{label}: {value}")
    console.print(tree)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def print_run_summary(summary: RunSummary) -> None:
    """The metrics of the model the run tested (the best epoch's; test/* on best.ckpt), the last epoch's
    beside them where it is another, and where the run's files are."""
    table = Table(title=f"dlrun · {summary.status}", show_header=True, header_style="bold")
    metrics = ordered(summary.metrics)
    last = summary.last_epoch or {}
    last_metrics = last.get("metrics") or {}
    # the last epoch's column where it differs from the best's (early stopping, a later worse epoch)
    show_last = last.get("epoch") is not None and last.get("epoch") != summary.best_epoch and last_metrics
    table.add_column("metric")
    table.add_column("value" if not show_last else f"best epoch ({summary.best_epoch})", justify="right")
    if show_last:
        table.add_column(f"last epoch ({last['epoch']})", justify="right")
    for name, value in metrics.items():
        table.add_row(name, format_value(value), *([show_value(last_metrics.get(name))] if show_last else []))
    console.print(table)
    kept = (f"best [bold]{summary.monitor}[/bold] = {format_value(summary.best_value)} at epoch {summary.best_epoch}"
            if summary.monitor else f"nothing monitored: kept the last epoch, {summary.best_epoch}")
    console.print(
        f"{kept} · {summary.epochs} epochs · {summary.wall_seconds or 0:.1f} s"
        f" · {summary.params or 0:,} parameters"
    )
    console.print(f"run directory: [link]{summary.run_dir}[/link]")


def show_value(value: Any) -> str:
    """A table cell: empty for a value not recorded."""
    return "" if value is None else format_value(value)


def print_user_error(error: UserError) -> None:
    """One short panel on stderr: what was wrong and what to type instead."""
    body = Text(error.message)
    if error.hint:
        body.append("\n\n" + error.hint, style="dim")
    err_console.print(Panel(body, title=f"[bold red]{error.title}[/bold red]", border_style="red", expand=False))
