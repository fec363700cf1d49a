"""Sweeps: every job in its own process (`launcher.py`), the Optuna study of random/tpe/qmc/cmaes searches
(`study.py`), and one summary of a sweep directory (`summary.py`).

Hydra's side of the launcher and the sweeper lives in `hydra_plugins/dlrun_launcher/`, where Hydra looks for plugins;
it imports this package, which registers the resolver that `conf/hydra/default.yaml` uses.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def _coalesce(*values: Any) -> Any:
    """`${dlrun.coalesce:a,b}`: the first value that is not null (`sweep.resume` or a new sweep dir)."""
    return next((v for v in values if v is not None), None)


if not OmegaConf.has_resolver("dlrun.coalesce"):
    OmegaConf.register_new_resolver("dlrun.coalesce", _coalesce)
