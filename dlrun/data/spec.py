"""DataSpec: what a data set tells the model. Models are built from it, never from the data set's name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TASKS = ("multiclass", "binary", "regression")  # what a data set's labels pose (dataset.task)
GRAPH_TASKS = ("node_classification",)  # one graph, its nodes the samples


@dataclass(frozen=True)
class Graph:
    """The one graph of a node-classification data set: `edges` is a (2, E) integer array of node pairs,
    each undirected edge listed in both directions. The model makes its shift operator S from it."""

    num_nodes: int
    edges: Any  # numpy (2, E) int64; no numpy import here, so that the CLI reads specs without it


#: tasks that a model sets (dlrun/models/base.py: model_task), which learn from the inputs alone: the data set's
#: labels are ignored, and its inputs are scaled to [0, 1] instead of standardized (the datamodule's unit_inputs)
INPUT_TASKS = ("reconstruction", "generative", "adversarial", "boltzmann")


@dataclass(frozen=True)
class DataSpec:
    """Task, input shape (one sample, no batch dimension) and number of outputs.

    `input_shape` is (C, H, W) for images, (T, F) for sequences and (F,) for flat vectors; `kind`
    names which. `per_step` marks targets at every time step (language models: many-to-many).
    `vocab_size` is set when the inputs are token indices rather than numbers. `graph` is set for
    node classification: a sample is a node, its input the node's features (F,), and every batch is the
    whole graph (dlrun/data/graphs.py). A model of INPUT_TASKS (autoencoder, vae) replaces `task` and keeps
    `class_names`, which colour its latent space and train the sample-quality classifier.
    """

    name: str
    task: str
    input_shape: tuple[int, ...]
    num_outputs: int
    class_names: tuple[str, ...] = ()
    per_step: bool = False
    vocab_size: int | None = None
    graph: Graph | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS + GRAPH_TASKS + INPUT_TASKS:
            raise ValueError(f"task must be one of {TASKS + GRAPH_TASKS + INPUT_TASKS}, not {self.task!r}")
        if (self.graph is None) != (self.task not in GRAPH_TASKS):
            raise ValueError(f"a {self.task} spec {'needs' if self.graph is None else 'takes no'} graph")
        if len(self.input_shape) not in (1, 2, 3):
            raise ValueError(f"input_shape must be (F,), (T, F) or (C, H, W), not {self.input_shape}")

    @property
    def kind(self) -> str:
        return {3: "image", 2: "sequence", 1: "flat"}[len(self.input_shape)]

    @property
    def flat_features(self) -> int:
        n = 1
        for d in self.input_shape:
            n *= d
        return n

    def describe(self) -> str:
        shape = "×".join(str(d) for d in self.input_shape)
        if self.graph is not None:
            edges = self.graph.edges.shape[1] // 2
            return (f"{self.name} (graph of {self.graph.num_nodes} nodes, {edges} edges, node features {shape}, "
                    f"{self.task}, {self.num_outputs} outputs)")
        if self.task in INPUT_TASKS:  # the output is the input's shape
            return f"{self.name} ({self.kind} {shape}, {self.task})"
        return f"{self.name} ({self.kind} {shape}, {self.task}, {self.num_outputs} outputs)"
