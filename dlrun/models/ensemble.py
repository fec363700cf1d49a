"""Model averaging (004 §5.7): not a config option; `dlrun-eval` builds it from trained runs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Ensemble(nn.Module):
    """The members' mean prediction, returned as the task's raw output so that every loss and metric applies.

    Classes: the log of the mean probability, a valid logit for softmax, argmax and cross-entropy (averaging
    logits instead would be a different, geometric-mean model). Binary: the logit of the mean probability.
    Regression: the mean output.
    """

    def __init__(self, members: list[nn.Module], task: str):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([member(x) for member in self.members])
        log_k = math.log(len(self.members))
        if self.task == "multiclass":
            return torch.logsumexp(F.log_softmax(outputs, dim=-1), dim=0) - log_k
        if self.task == "binary":  # log p̄ − log(1 − p̄), each a log-mean-exp of log-sigmoids: no 0/0 at saturation
            return torch.logsumexp(F.logsigmoid(outputs), dim=0) - torch.logsumexp(F.logsigmoid(-outputs), dim=0)
        return outputs.mean(dim=0)
