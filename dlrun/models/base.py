"""What every network shares: which input kinds it takes, how it reads them, and how it is built."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.errors import IncompatibleError, UserError


class Network(nn.Module):
    """Base class of dlrun's networks.

    `accepts` lists the input kinds (image, sequence, flat) a network can read; `build_network`
    refuses any other before training starts. Subclasses take `spec` plus their own knobs.
    """

    accepts: ClassVar[frozenset[str]] = frozenset({"image", "sequence", "flat"})
    # Tasks the network can produce outputs for; per-step (language-model) targets need a sequence model.
    per_step_capable: ClassVar[bool] = False

    def __init__(self, spec: DataSpec):
        super().__init__()
        self.spec = spec


def as_sequence(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images become (N, H, C*W): H steps of one row each. Sequences pass through."""
    if x.dim() == 4:
        n, c, h, w = x.shape
        return x.permute(0, 2, 1, 3).reshape(n, h, c * w)
    if x.dim() == 2:  # flat vectors: one step per feature
        return x.unsqueeze(-1)
    return x


def sequence_shape(spec: DataSpec) -> tuple[int, int]:
    """(steps, features) that `as_sequence` produces for this spec."""
    shape = spec.input_shape
    if len(shape) == 3:
        c, h, w = shape
        return h, c * w
    if len(shape) == 1:
        return shape[0], 1
    return shape[0], shape[1]


def build_network(model_cfg: DictConfig, spec: DataSpec, model_name: str, overrides: dict[str, Any] | None = None):
    """Instantiate the configured network for `spec`, after checking that it can read the data.

    `overrides` are knobs set by regularizers (dropout sets `dropout`); they apply to the knobs this
    model has, and a regularizer that finds none of its knobs is refused with both names.
    """
    cls = get_class(model_cfg._target_)
    accepts = getattr(cls, "accepts", None)
    if accepts is not None and spec.kind not in accepts:
        raise IncompatibleError(
            f"model={model_name} cannot take dataset={spec.name}: its inputs are {spec.kind} of shape "
            f"{tuple(spec.input_shape)}, and {model_name} reads only {', '.join(sorted(accepts))} inputs.",
            "Pick a model that reads this input kind (e.g. model=mlp flattens anything).",
        )
    if spec.per_step and not getattr(cls, "per_step_capable", False):
        raise IncompatibleError(
            f"model={model_name} cannot take dataset={spec.name}: the data set has a target at every step "
            "(a language model), and this model makes one prediction per sequence.",
            "Use a recurrent or transformer model (model=lstm, model=transformer).",
        )
    kwargs = {}
    for key, value in (overrides or {}).items():
        if key in model_cfg:
            kwargs[key] = value
    cfg = OmegaConf.merge(model_cfg, kwargs) if kwargs else model_cfg
    # partial, then call: passed as an instantiate kwarg, the DataSpec dataclass would become a dict
    return instantiate(cfg, _partial_=True, _convert_="all")(spec=spec)


def require_knobs(model_cfg: DictConfig, model_name: str, knobs: tuple[str, ...], regularizer: str) -> None:
    """Refuse a regularizer that acts through model knobs the model does not have."""
    if not any(k in model_cfg for k in knobs):
        raise UserError(
            f"regularizer={regularizer} sets the model's {' / '.join(knobs)}, and model={model_name} has no such knob.",
            "Drop the regularizer, or pick a model that has it.",
            title="Incompatible regularizer and model",
        )
