"""What dlrun measures, declared once: every metric's name, the stages that log it, which way is better,
and each task's headline score. No torch here: the sweep summary and the CLI read it without loading torch.

Everything that names a metric derives from these tables: what an epoch logs (the metrics object in
dlrun/training/metrics.py keeps only declared names), what `callbacks.monitor` accepts, the order of
the run's final table, which metrics `summary.json` reports, and the sweep table's headline columns.

To add a metric, declare it here; its value comes from sums computed on the device: a task's metric from
its task's `stats`/`eval_stats` and `metrics` (dlrun/training/tasks.py), a diagnostic from
dlrun/training/metrics.py. tests/test_metrics.py checks that every declared name is computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: train_eval: the training data measured again in evaluation mode (dropout off, batch norm on its running
#: statistics) after each validation, with trainer.train_eval; beside val/* it shows the generalization gap,
#: which train/* (measured while training, in training mode) blurs
TRAIN_EVAL = "train_eval"
STAGES = ("train", TRAIN_EVAL, "val", "test")
EVALUATION = ("val", "test")
TRAINING = ("train",)


@dataclass(frozen=True)
class Metric:
    """One metric, logged as `<stage>/<name>` for each of its stages."""

    name: str
    mode: str  # "min" or "max": which way is better (the `callbacks.mode` to monitor it with)
    stages: tuple[str, ...]
    #: a diagnostic's value is the epoch's sum of `ratio[0]` over the sum of `ratio[1]`
    ratio: tuple[str, str] | None = None


_LOSS = Metric("loss", "min", STAGES)  # the data loss: no penalty, no label smoothing
_ACC = Metric("acc", "max", STAGES)
# evaluation passes only, so that a training step pays nothing for them
_PRF = tuple(Metric(name, "max", (TRAIN_EVAL, *EVALUATION)) for name in ("precision", "recall", "f1"))
_RECON = Metric("recon", "min", STAGES)  # the input tasks' reconstruction term

#: each task's metrics (keyed by Task.kind), in the order a reader looks at them
TASK_METRICS: dict[str, tuple[Metric, ...]] = {
    "multiclass": (_LOSS, _ACC, *_PRF),  # precision, recall, F1: macro averages
    "binary": (_LOSS, _ACC, *_PRF),  # of the positive class (label 1)
    "per_step": (_LOSS, _ACC, Metric("bpc", "min", STAGES), Metric("ppl", "min", STAGES)),  # language models
    "node_classification": (_LOSS, _ACC, *_PRF),  # on the nodes of each split of one graph
    "regression": (_LOSS, Metric("mse", "min", STAGES), Metric("mae", "min", STAGES), Metric("r2", "max", STAGES)),
    "reconstruction": (_LOSS, _RECON),  # per input element: the loss is the reconstruction error
    # per sample, in nats: loss = recon + kl, the negative ELBO; bpd = loss / (input elements x ln 2)
    "generative": (_LOSS, _RECON, Metric("kl", "min", STAGES), Metric("bpd", "min", STAGES)),
    # model=gan: loss is the generator's; the discriminator's loss, mean D(x) on real data and D(G(z)) on samples
    "adversarial": (_LOSS, Metric("d_loss", "min", STAGES), Metric("d_real", "max", STAGES),
                    Metric("d_fake", "max", STAGES)),
    # model=rbm: loss is the reconstruction error; the log pseudo-likelihood per sample
    "boltzmann": (_LOSS, Metric("pseudo_ll", "max", STAGES)),
}

#: each task's main score: the sweep table's headline column beside the monitored metric's test twin
HEADLINE: dict[str, str] = {"per_step": "bpc", "multiclass": "acc", "binary": "acc", "regression": "r2",
                             "node_classification": "acc",
                             "generative": "bpd", "reconstruction": "recon",  # bpd first: a VAE logs recon too
                             "adversarial": "d_fake", "boltzmann": "pseudo_ll"}

#: training diagnostics, kept as device sums like the task's statistics
DIAGNOSTICS: tuple[Metric, ...] = (
    Metric("penalty", "min", TRAINING, ratio=("penalty", "penalized_steps")),  # summed penalties, mean per step
    Metric("grad_norm", "min", TRAINING, ratio=("grad_norm", "optimizer_steps")),  # global L2 norm before clipping
    Metric("sparsity", "max", TRAINING, ratio=("near_zero", "weights")),  # penalized weights |w| < 1e-3, at the end
)

#: the fraction of ReLU units no sample of the split makes positive; logged by networks with nn.ReLU modules
DEAD_RELU = Metric("dead_relu", "min", EVALUATION)

#: the learning rate the epoch trained with, logged without a stage
LEARNING_RATE = "lr"


def stage_metrics(kind: str, stage: str, relu: bool = True) -> tuple[Metric, ...]:
    """The metrics `stage` logs for a task of `kind` (dead_relu only where the network has ReLUs)."""
    declared = (*TASK_METRICS[kind], *DIAGNOSTICS, *((DEAD_RELU,) if relu else ()))
    return tuple(m for m in declared if stage in m.stages)


def monitorable(kind: str, relu: bool, stages: tuple[str, ...] = ("train", "val")) -> set[str]:
    """Every name a training run of this task logs in `stages`: what `callbacks.monitor` may watch (not test/*)."""
    names = {f"{stage}/{m.name}" for stage in stages for m in stage_metrics(kind, stage, relu)}
    return names | {LEARNING_RATE}


def monitor_example(kind: str) -> str:
    """A monitor for the task's headline, with its mode: for error messages."""
    headline = next(m for m in TASK_METRICS[kind] if m.name == HEADLINE[kind])
    return f"callbacks.monitor=val/{headline.name} callbacks.mode={headline.mode}"


def headline_test_names() -> tuple[str, ...]:
    """The test metrics a sweep table shows when its jobs have them, in order of preference: each task's
    headline (a language model's bpc before the accuracy it also logs), then the loss every task has."""
    return tuple(dict.fromkeys([*(f"test/{name}" for name in HEADLINE.values()), f"test/{_LOSS.name}"]))


def ordered(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`metrics` in reading order: by stage, then as declared; anything undeclared last, by name."""
    declared = [*(m.name for ms in TASK_METRICS.values() for m in ms), *(m.name for m in DIAGNOSTICS), DEAD_RELU.name]
    rank = {name: i for i, name in enumerate(dict.fromkeys(declared))}

    def key(name: str) -> tuple:
        stage, _, metric = name.rpartition("/")
        known = stage in STAGES and metric in rank
        return (not known, STAGES.index(stage) if known else 0, rank.get(metric, 0), name)

    return {name: metrics[name] for name in sorted(metrics, key=key)}


def summary_metrics(tracked: Mapping[str, Any], tested: Mapping[str, float]) -> dict[str, Any]:
    """What summary.json reports: `metrics`, the train/val metrics of the best epoch (the model
    best.ckpt holds) beside `tested` (measured on best.ckpt), and `last_epoch`, the last epoch's
    number and metrics. `tracked` is MonitorTracker's state (callbacks.py)."""
    return {
        "metrics": ordered({**tracked.get("best_metrics", {}), **tested}),
        "last_epoch": {"epoch": tracked.get("last_epoch"), "metrics": ordered(tracked.get("last_metrics", {}))},
    }

