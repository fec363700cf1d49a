"""The epoch's metrics as device sums: `EpochMetrics`, which Experiment owns and feeds.

Each evaluation batch, and each group of training steps at once, adds sufficient statistics (the task's
loss sum, correct count, per-class counts, ...; the diagnostics' sums) on the device; at the epoch's end
one all-reduce (across DDP ranks) and one host sync turn them into the declared metrics (dlrun/metrics.py).
Summing, not averaging, makes an epoch's metric exact whatever the batch sizes and groupings, costs no
host-device sync per step, and reduces correctly across ranks.

Also here, the diagnostics' sums: gradient norms, the sparsity of penalized weights, and dead ReLUs
(forward hooks during evaluation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dlrun import metrics as declared
from dlrun.training.regularizers import penalized_weights
from dlrun.training.tasks import Task

# A training batch whose output has at most this many elements is scored at its group's end, with the
# group's other batches: a few operations per group instead of per step (most of a small network's
# overhead). Larger outputs (a language model's logits) are scored at once rather than held, and so are
# those of tasks whose sums are not exact over concatenated batches (Task.scores_groups).
GROUP_SCORED_NUMEL = 1 << 16

#: |w| below this counts as a zero weight in train/sparsity
NEAR_ZERO = 1e-3

Scored = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (output, target, mean loss) of one batch


class EpochMetrics:
    """The statistics of each stage's epoch so far, turned into `<stage>/<metric>` values by `compute`.

    Feed it with `score` (every batch) or `record` (the sums of a task that scores itself), `add_penalty` and
    `add_gradient_norms` (training steps), `flush` (at a group's end), `start_evaluation` (before a
    validation or test pass).
    """

    def __init__(self, task: Task, network: nn.Module):
        self.task = task
        self.network = network
        # Device tensors not yet summed (a group's, until `flush`), their running device sums, host counts.
        self._pending: dict[str, dict[str, list[torch.Tensor]]] = {stage: {} for stage in declared.STAGES}
        self._sums: dict[str, dict[str, torch.Tensor]] = {stage: {} for stage in declared.STAGES}
        self._counts: dict[str, dict[str, float]] = {stage: {} for stage in declared.STAGES}
        # The training group's steps not yet scored, and each step's per-parameter gradient norms
        self._unscored: list[Scored] = []
        self._grad_norms: list[list[torch.Tensor]] = []
        self._dead_units = DeadUnits(network)  # counts during the validation and test passes only

    def monitorable(self) -> set[str]:
        """Every name the run logs for its task and network: what callbacks.monitor may watch."""
        return declared.monitorable(self.task.kind, relu=bool(self._dead_units.relus))

    # --- feeding ----------------------------------------------------------------------------------
    def score(self, output: torch.Tensor, target: torch.Tensor, stage: str) -> torch.Tensor:
        """The batch's data loss; its statistics go to the stage's sums (a small training batch's when its
        group is flushed, see GROUP_SCORED_NUMEL)."""
        loss = self.task.loss(output, target)
        scored = (output.detach(), target, loss.detach())
        if stage == "train" and self.task.scores_groups and output.numel() <= GROUP_SCORED_NUMEL:
            self._unscored.append(scored)
        else:
            self._add(stage, self._stats([scored], stage))
        return loss

    def record(self, stage: str, stats: dict[str, torch.Tensor | int]) -> None:
        """Sums a task's statistics that its own training loop computed (the generative models'), for `stage`."""
        self._add(stage, stats)

    def add_penalty(self, penalty: torch.Tensor) -> None:
        """A training step's summed penalty terms (train/penalty)."""
        self._add("train", {"penalty": penalty, "penalized_steps": 1})

    def add_gradient_norms(self, parameters: list[nn.Parameter]) -> None:
        """A step's final gradients (before clipping): their per-parameter norms now, the global norm
        (train/grad_norm) at the group's end."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:
            self._grad_norms.append(torch._foreach_norm(grads))

    def start_evaluation(self) -> None:
        """Before a validation or test pass: count the ReLUs' active units (dead_relu)."""
        self._dead_units.start()

    def flush(self, stage: str) -> None:
        """Score the training group's batches, then add the pending tensors to the running sums: a few
        operations per key, not per batch."""
        if stage == "train":
            if self._unscored:
                self._add("train", self._stats(self._unscored, "train"))
                self._unscored = []
            if self._grad_norms:
                self._add("train", _global_grad_norms(self._grad_norms))
                self._grad_norms = []
        sums = self._sums[stage]
        for key, values in self._pending[stage].items():
            total = torch.stack(values).to(_sum_dtype(values[0].device)).sum(0)
            sums[key] = sums[key] + total if key in sums else total
        self._pending[stage] = {}

    # --- the epoch's end --------------------------------------------------------------------------
    def compute(self, stage: str, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The stage's epoch metrics, `<stage>/<name>`, and a fresh epoch. `reduce` sums a tensor across
        DDP ranks (None: one process). One reduction and one host sync, whatever the number of metrics."""
        active = self._dead_units.stop() if stage in declared.DEAD_RELU.stages else None
        self.flush(stage)
        if stage == "train" and self._counts["train"]:  # some training step ran this epoch
            self._add("train", sparsity_counts(self.network))
            self.flush("train")
        sums, counts = self._sums[stage], self._counts[stage]
        self._sums[stage], self._counts[stage] = {}, {}
        if not sums and not counts:
            return {}
        device = next(iter(sums.values())).device if sums else _device_of(self.network)
        dtype = _sum_dtype(device)
        # Scalar and vector sums (per-class counts, active units) in one flat tensor: one all-reduce, one sync.
        parts = [
            *(sums[k].reshape(-1) for k in sorted(sums)),
            torch.tensor([float(counts[k]) for k in sorted(counts)], dtype=dtype, device=device),
        ]
        if active is not None:
            parts.append(active.to(device=device, dtype=dtype))
        flat = torch.cat(parts)
        flat = reduce(flat) if reduce is not None else flat
        if active is not None:  # a unit lives if a sample on any rank made it positive
            dead = (flat[-active.numel():] == 0).float().mean()
            flat = torch.cat([flat[: -active.numel()], dead.to(dtype).reshape(1)])
        values = flat.tolist()  # the one host sync per epoch
        totals, start = {}, 0
        for key in sorted(sums):  # split back: a float per scalar sum, a list per vector sum
            size = sums[key].numel()
            totals[key] = values[start : start + size] if sums[key].dim() else values[start]
            start += size
        totals |= dict(zip(sorted(counts), values[start : start + len(counts)], strict=True))
        computed = self.task.metrics(totals)
        for metric in declared.DIAGNOSTICS:
            numerator, denominator = metric.ratio
            if numerator in totals:
                computed[metric.name] = totals[numerator] / max(totals[denominator], 1.0)
        if active is not None:
            computed[declared.DEAD_RELU.name] = values[-1]
        kept = declared.stage_metrics(self.task.kind, stage)
        return {f"{stage}/{m.name}": computed[m.name] for m in kept if m.name in computed}

    # --- internals --------------------------------------------------------------------------------
    def _add(self, stage: str, stats: dict[str, torch.Tensor | float]) -> None:
        """Record a batch's statistics: tensors wait for `flush`, plain numbers are summed at once."""
        pending, counts = self._pending[stage], self._counts[stage]
        for key, value in stats.items():
            if isinstance(value, torch.Tensor):
                pending.setdefault(key, []).append(value.detach())
            else:
                counts[key] = counts.get(key, 0) + value

    def _stats(self, batches: list[Scored], stage: str) -> dict:
        """The task's sums over (output, target, mean loss) batches, scored as one concatenated batch."""
        # Each batch's loss times its size, in float64: the products are exact, so the epoch's loss sum is
        # the same whatever the grouping. One batch (every evaluation batch) skips the concatenation.
        sizes = [target.numel() for _, target, _ in batches]
        if len(batches) == 1:
            output, target, loss = batches[0]
            loss_sum = loss.to(_sum_dtype(loss.device)) * sizes[0]
        else:
            output, target = (torch.cat([batch[i] for batch in batches]) for i in (0, 1))
            losses = torch.stack([loss for _, _, loss in batches])
            dtype = _sum_dtype(losses.device)
            loss_sum = (losses.to(dtype) * torch.tensor(sizes, dtype=dtype, device=losses.device)).sum()
        stats = self.task.stats(output, target, loss_sum)
        if stage != "train":  # evaluation-only statistics keep the training step's cost unchanged
            stats |= self.task.eval_stats(output, target)
        return stats


class DeadUnits:
    """The fraction of dead ReLUs over an evaluation pass, a training diagnostic the notes teach (004 §4.2,
    §6.4.5): counts active samples per unit of every `nn.ReLU` of `network` between `start` and `stop`.

    A unit is one element of a ReLU layer's output for one sample: a neuron of a fully connected layer, or
    one position of one feature map in a convolutional layer. It is dead on a split when no sample of the
    split makes it positive: it passes no gradient, so it cannot learn again (000 §6.4 on zero init).
    Forward hooks are attached for the validation and test passes only, so training steps pay nothing.
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


def sparsity_counts(network: nn.Module) -> dict[str, torch.Tensor | int]:
    """How many penalized weights are near zero (|w| < NEAR_ZERO, a device sum), and how many there are."""
    weights = penalized_weights(network)
    if not weights:
        return {}
    near_zero = torch.stack([(w.detach().abs() < NEAR_ZERO).sum() for w in weights]).sum()
    return {"near_zero": near_zero, "weights": sum(w.numel() for w in weights)}


def _global_grad_norms(per_parameter: list[list[torch.Tensor]]) -> dict[str, torch.Tensor | int]:
    """The summed global L2 gradient norms of steps, from each step's per-parameter norms (as
    torch.nn.utils.get_total_norm computes them), in one reduction when every step had the same gradients."""
    if len({len(norms) for norms in per_parameter}) == 1:
        rows = torch.stack([norm for norms in per_parameter for norm in norms]).view(len(per_parameter), -1)
        per_step = torch.linalg.vector_norm(rows, dim=1)
    else:
        per_step = torch.stack([torch.linalg.vector_norm(torch.stack(norms)) for norms in per_parameter])
    # in float64: the float32 norms add exactly, so the epoch's sum is the same whatever the grouping
    return {"grad_norm": per_step.to(_sum_dtype(per_step.device)).sum(), "optimizer_steps": len(per_parameter)}


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 keeps long sums exact; Apple's MPS has no float64, so it sums in float32."""
    return torch.float32 if device.type == "mps" else torch.float64


def _device_of(network: nn.Module) -> torch.device:
    return next((p.device for p in network.parameters()), torch.device("cpu"))
