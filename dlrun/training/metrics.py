"""The epoch's metrics as device sums: `EpochMetrics`, which Experiment owns and feeds.

Each evaluation batch, and each group of training steps at once, adds sufficient statistics (the task's
loss sum, correct count, per-class counts, ...; the diagnostics' sums) on the device; at the epoch's end
one all-reduce (across DDP ranks) and one host sync turn them into the declared metrics (dlrun/metrics.py).
Summing, not averaging, makes an epoch's metric exact whatever the batch sizes and groupings, costs no
host-device sync per step, and reduces correctly across ranks.

Also here, the diagnostics' sums: gradient norms, the sparsity of penalized weights, dead ReLUs and, when
asked (callbacks.activations), per-layer activation statistics (forward hooks during evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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
    validation or test pass), `evaluating` (before an evaluation batch, when one pass measures several
    stages: validation and train_eval).
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
        self._probe = ActivationProbe(network)  # counts during the validation and test passes only
        #: each evaluation stage's per-layer activation statistics of its last pass, with `track_layers`
        self.layer_stats: dict[str, list[LayerStats]] = {}

    def monitorable(self, stages: tuple[str, ...] = ("train", "val")) -> set[str]:
        """Every name the run logs in `stages` for its task and network: what callbacks.monitor may watch."""
        return declared.monitorable(self.task.kind, relu=bool(self._probe.relus), stages=stages)

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
        self._probe.start()

    def evaluating(self, stage: str) -> None:
        """The next evaluation batches are `stage`'s: only validation and test batches count active units."""
        self._probe.counting = stage in declared.DEAD_RELU.stages

    def track_layers(self) -> None:
        """From the next evaluation pass on, also measure every activation layer (`layer_stats`)."""
        self._probe.per_layer = True

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
        probed = self._probe.stop() if stage in declared.DEAD_RELU.stages else None
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
        # Scalar and vector sums (per-class counts, active units, layer sums) in one flat tensor: one
        # all-reduce, one sync.
        parts = [
            *(sums[k].reshape(-1) for k in sorted(sums)),
            torch.tensor([float(counts[k]) for k in sorted(counts)], dtype=dtype, device=device),
        ]
        probe_counts = probed.flat().to(device=device, dtype=dtype) if probed is not None else None
        if probe_counts is not None:
            parts.append(probe_counts)
        flat = torch.cat(parts)
        flat = reduce(flat) if reduce is not None else flat
        if probe_counts is not None:  # per-unit counts -> dead fractions, on the device, before the one sync
            size = probe_counts.numel()
            flat = torch.cat([flat[:-size], probed.summarize(flat[-size:])])
        values = flat.tolist()  # the one host sync per epoch
        if probed is not None:  # the probe's values last
            cut = len(values) - probed.summarized_size
            values, probe_values = values[:cut], values[cut:]
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
        if probed is not None:
            dead, self.layer_stats[stage] = probed.decode(probe_values)
            if dead is not None:
                computed[declared.DEAD_RELU.name] = dead
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


#: activation layers the per-layer statistics measure, and the bounds of the saturating ones
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.Sigmoid, nn.Tanh)
BOUNDS = {nn.Tanh: (-1.0, 1.0), nn.Sigmoid: (0.0, 1.0)}
#: an output this close to a saturating activation's bound counts as saturated (|tanh| > 0.99)
SATURATION_MARGIN = 0.01


@dataclass(frozen=True)
class LayerStats:
    """One activation layer's outputs over an evaluation pass: mean and standard deviation over every
    sample and unit; for tanh and sigmoid the fraction of outputs within SATURATION_MARGIN of a bound; for
    ReLU the fraction of its units no sample made positive (dead_relu's definition, layer by layer)."""

    layer: str  # the module's name in the network: net.2
    kind: str  # the activation: tanh, relu, ...
    mean: float
    std: float
    saturated: float | None
    dead: float | None


class ActivationProbe:
    """Forward hooks on a network's activations during evaluation passes, between `start` and `stop`.

    Always, for dead_relu (004 §4.2, §6.4.5): the active samples per unit of every `nn.ReLU`. A unit is
    one element of a ReLU layer's output for one sample: a neuron of a fully connected layer, or one
    position of one feature map in a convolutional layer. It is dead on a split when no sample of the split
    makes it positive: it passes no gradient, so it cannot learn again (000 §6.4 on zero init). With
    `per_layer`, also the sums behind each activation layer's LayerStats (004 §4.2.2, Fig. 58: activations
    vanish or saturate with depth). Hooks are attached for the validation and test passes only, so training
    steps pay nothing. Activations applied inside fused kernels (a `relu` RNN's nonlinearity, a transformer
    layer's inference fast path) never call their module and are not counted; with no ReLU counted there
    is no dead_relu.
    """

    def __init__(self, network: nn.Module):
        self.relus = [m for m in network.modules() if isinstance(m, nn.ReLU)]
        self.layers = {m: name for name, m in network.named_modules() if isinstance(m, ACTIVATIONS)}
        self.per_layer = False
        self.counting = True  # False while the pass measures the training data (train_eval)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active: dict[nn.Module, torch.Tensor] = {}
        self._sums: dict[nn.Module, torch.Tensor] = {}

    def start(self) -> None:
        self.stop()
        self.counting = True
        watched = list(self.layers) if self.per_layer else self.relus
        self._handles = [module.register_forward_hook(self._record) for module in watched]

    def _record(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if not self.counting:
            return
        output = output.detach()
        if isinstance(module, nn.ReLU):
            active = (output > 0).sum(0)
            self._active[module] = self._active[module] + active if module in self._active else active
        if self.per_layer:
            values = output.to(_sum_dtype(output.device))
            low, high = BOUNDS.get(type(module), (-math.inf, math.inf))
            saturated = ((values - low < SATURATION_MARGIN) | (high - values < SATURATION_MARGIN)).sum()
            sums = torch.stack([values.sum(), (values * values).sum(), values.new_tensor(float(values.numel())),
                                saturated.to(values.dtype)])
            self._sums[module] = self._sums[module] + sums if module in self._sums else sums

    def stop(self) -> Probed | None:
        """Detach the hooks; return what they counted, in a fixed order (so that DDP ranks can add theirs),
        or None when nothing ran."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        relus = [relu for relu in self.relus if relu in self._active]
        layers = [m for m in self.layers if m in self._sums]
        probed = Probed(
            active=[self._active[relu].flatten() for relu in relus],
            relu_layers=[self.layers.get(relu, "") for relu in relus],
            sums=[self._sums[m] for m in layers],
            layers=[(self.layers[m], type(m).__name__.lower()) for m in layers],
        )
        self._active, self._sums = {}, {}
        return probed if probed.active or probed.sums else None


@dataclass
class Probed:
    """One evaluation pass's counts (ActivationProbe.stop): flattened for the epoch's one reduction, then
    summarized on the device and decoded on the host."""

    active: list[torch.Tensor]  # per counted ReLU layer: active samples per unit
    relu_layers: list[str]  # their names
    sums: list[torch.Tensor]  # per measured layer: sum, sum of squares, count, saturated count
    layers: list[tuple[str, str]]  # their (name, kind)

    def flat(self) -> torch.Tensor:
        return torch.cat([*self.active, *self.sums])

    @property
    def summarized_size(self) -> int:
        """The length of `summarize`'s result: dead_relu, each ReLU layer's dead fraction, the layer sums."""
        return (1 + len(self.active) if self.active else 0) + 4 * len(self.sums)

    def summarize(self, reduced: torch.Tensor) -> torch.Tensor:
        """The reduced `flat()` -> dead fractions (all ReLU units, then each layer's), then the layer sums: a
        unit lives if a sample on any rank made it positive."""
        sizes = [a.numel() for a in self.active]
        units, sums = reduced[: sum(sizes)], reduced[sum(sizes):]
        if not sizes:
            return sums
        dead = units == 0
        per_layer = [part.float().mean() for part in dead.split(sizes)]
        return torch.cat([torch.stack([dead.float().mean(), *per_layer]).to(reduced.dtype), sums])

    def decode(self, values: list[float]) -> tuple[float | None, list[LayerStats]]:
        """(dead_relu or None, each measured layer's LayerStats) from `summarize`'s values on the host."""
        dead_relu, dead_of = None, {}
        if self.active:
            dead_relu = values[0]
            dead_of = dict(zip(self.relu_layers, values[1 : 1 + len(self.active)], strict=True))
            values = values[1 + len(self.active):]
        stats = []
        for i, (name, kind) in enumerate(self.layers):
            total, squares, count, saturated = values[4 * i : 4 * i + 4]
            count = max(count, 1.0)
            mean = total / count
            stats.append(LayerStats(name, kind, mean, max(squares / count - mean * mean, 0.0) ** 0.5,
                                    saturated / count if kind in ("tanh", "sigmoid") else None, dead_of.get(name)))
        return dead_relu, stats


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
