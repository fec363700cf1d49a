"""The fraction of dead ReLUs over an evaluation pass, a training diagnostic the notes teach (004 §4.2, §6.4.5).

A unit is one element of a ReLU layer's output for one sample: a neuron of a fully connected layer, or
one position of one feature map in a convolutional layer. It is dead on a split when no sample of the
split makes it positive: it passes no gradient, so it cannot learn again (000 §6.4 on zero init).
Forward hooks count, per unit, the samples that made it positive; they are attached for the
validation and test passes only, so training steps pay nothing.
"""

from __future__ import annotations

import torch
from torch import nn


class DeadUnits:
    """Counts active samples per unit of every `nn.ReLU` of `network` between `start` and `stop`.

    ReLUs applied inside fused kernels (a `relu` RNN's nonlinearity, a transformer layer's inference
    fast path) never call their module and are not counted; with none counted there is no metric.
    """

    def __init__(self, network: nn.Module):
        self.relus = [m for m in network.modules() if isinstance(m, nn.ReLU)]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active: dict[nn.Module, torch.Tensor] = {}

    def start(self) -> None:
        self.stop()
        self._handles = [relu.register_forward_hook(self._record) for relu in self.relus]

    def _record(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        active = (output.detach() > 0).sum(0)
        self._active[module] = self._active[module] + active if module in self._active else active

    def stop(self) -> torch.Tensor | None:
        """Detach the hooks; return every counted unit's number of active samples, flat, in a fixed order
        (so that DDP ranks can add theirs), or None when no ReLU ran."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        active = [self._active[relu].flatten() for relu in self.relus if relu in self._active]
        self._active = {}
        return torch.cat(active) if active else None
