"""What every network shares: which input kinds it takes, how it reads them, and how it is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlrun.data.spec import DataSpec
from dlrun.errors import IncompatibleError, UserError
from dlrun.models import init as init_schemes


class Network(nn.Module):
    """Base class of dlrun's networks.

    `accepts` lists the input kinds (image, sequence, flat) a network can read; `build_network`
    refuses any other before training starts. Subclasses take `spec` plus their own knobs.
    """

    accepts: ClassVar[frozenset[str]] = frozenset({"image", "sequence", "flat"})
    # Per-step (language-model) targets need a model that returns one output per step: (N, T, outputs).
    per_step_capable: ClassVar[bool] = False
    # A model of the inputs alone names its task (one of spec.INPUT_TASKS: autoencoder, vae); None: the data set's.
    task: ClassVar[str | None] = None

    def __init__(self, spec: DataSpec):
        super().__init__()
        self.spec = spec

    def refuse(self, reason: str, hint: str) -> IncompatibleError:
        """An error naming this model, the data set and its shape, for pairs only the knobs rule out."""
        return IncompatibleError(
            f"model={type(self).__name__.lower()} cannot take dataset={self.spec.name} "
            f"({self.spec.kind} of shape {tuple(self.spec.input_shape)}): {reason}",
            hint,
        )


def one_hot_tokens(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """Token indices (N, T) become their one-hot view (N, T, V), the shape `spec.input_shape` promises.

    Models without an embedding (mlp, cnn) read text this way; numbers pass through.
    """
    if spec.vocab_size and not x.is_floating_point():
        return F.one_hot(x.long(), spec.vocab_size).float()
    return x


class SequenceInput(nn.Module):
    """Reads any batch as (N, T, features) floats, for the sequence models.

    Token indices go through an embedding of size `dim` (the one-hot view times a matrix, without
    building the one-hot tensor); numbers are read by `as_sequence` and, with `project`, mapped to
    `dim` features by a linear layer (a transformer's input projection). `features` is the width out.
    """

    def __init__(self, spec: DataSpec, dim: int, project: bool = False):
        super().__init__()
        self.tokens = bool(spec.vocab_size)
        _, features = sequence_shape(spec)
        if self.tokens:
            self.proj: nn.Module = nn.Embedding(spec.vocab_size, dim)
        elif project:
            self.proj = nn.Linear(features, dim)
        else:
            self.proj = nn.Identity()
        self.features = dim if self.tokens or project else features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            return self.proj(x.long())
        return self.proj(as_sequence(x))


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


def model_task(model_cfg: DictConfig) -> str | None:
    """The task the configured model sets (Network.task), or None: the data set's labels set it."""
    return getattr(get_class(model_cfg._target_), "task", None)


def build_network(
    model_cfg: DictConfig, spec: DataSpec, model_name: str, overrides: dict[str, Any] | None = None
) -> nn.Module:
    """Instantiate the configured network for `spec`, after checking that it can read the data.

    `overrides` are knobs set by regularizers (dropout sets `dropout`); they apply to the knobs this
    model has, and a regularizer that finds none of its knobs is refused with both names. The knobs
    `init`, `init_std`, `init_value` and `init_bias` are dlrun's, not the class's: they are applied to whatever
    network the class builds (`dlrun.models.init`), so every model, a user's own included, has them.
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
            f"model={model_name} cannot take dataset={spec.name}: its inputs are {spec.kind} of shape "
            f"{tuple(spec.input_shape)} with a target at every step (a language model), and {model_name} "
            "makes one prediction per sequence.",
            "Use a recurrent, transformer or tcn model (model=lstm, model=transformer, model=tcn).",
        )
    kwargs = {}
    for key, value in (overrides or {}).items():
        if key in model_cfg:
            kwargs[key] = value
    cfg = OmegaConf.to_container(OmegaConf.merge(model_cfg, kwargs), resolve=True)
    init_knobs = {k: cfg.pop(k) for k in init_schemes.KNOBS if k in cfg}
    # partial, then call: passed as an instantiate kwarg, the DataSpec dataclass would become a dict;
    # called outside instantiate, the model's own errors (IncompatibleError) reach the user unwrapped
    make = instantiate(cfg, _partial_=True, _convert_="all")
    check_memory(make, spec, model_cfg, model_name)
    network = make(spec=spec)
    init_schemes.initialize(network, **init_knobs)
    return network


# Bytes per parameter while training: float32 weights, their gradient and two optimizer moments (Adam's).
TRAINING_BYTES_PER_PARAMETER = 16
_SIZE_KNOBS = ("width", "depth", "hidden", "layers", "channels", "d_model", "ffn", "blocks")


def check_memory(make, spec: DataSpec, model_cfg: DictConfig, model_name: str) -> None:
    """Refuse, before any allocation, a network whose weights and optimizer state exceed the memory here.

    The network is built on torch's meta device (shapes, no storage) to count its parameters; the
    limit is the larger of the host's available memory and the GPU's free memory (the run may use either).
    """
    try:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in make(spec=spec).parameters())
    except Exception:  # a network that cannot be built on meta: the real build reports its own errors
        return
    needed = parameters * TRAINING_BYTES_PER_PARAMETER
    available = max(_available_host_memory(), _free_gpu_memory())
    if available and needed > available:
        knobs = [f"model.{k} = {model_cfg[k]}" for k in _SIZE_KNOBS if k in model_cfg]
        raise UserError(
            f"model={model_name} has {parameters:,} parameters: training needs about {needed / 2**30:,.1f} GiB "
            f"(weights, gradients and optimizer state), and this machine has {available / 2**30:,.1f} GiB available.",
            f"Lower {', '.join(knobs) if knobs else 'the model size'}.", title="Model too large")


def _available_host_memory() -> int:
    """MemAvailable of /proc/meminfo (Linux); 0 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _free_gpu_memory() -> int:
    if not torch.cuda.is_available():
        return 0
    return max(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))


def require_knobs(model_cfg: DictConfig, model_name: str, knobs: tuple[str, ...], regularizer: str) -> None:
    """Refuse a regularizer that acts through model knobs the model does not have."""
    if not any(k in model_cfg for k in knobs):
        raise UserError(
            f"regularizer={regularizer} sets the model's {' / '.join(knobs)}, and model={model_name} has no such knob.",
            "Drop the regularizer, or pick a model that has it.",
            title="Incompatible regularizer and model",
        )
