"""DataSpec: what a data set tells the model. Models are built from it, never from the data set's name."""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("multiclass", "binary", "regression")  # what a data set's labels pose
#: tasks that a model sets (dlrun/models/base.py: model_task), which learn from the inputs alone: the data set's
#: labels are ignored, and its inputs are scaled to [0, 1] instead of standardized (the datamodule's unit_inputs)
INPUT_TASKS = ("reconstruction", "generative")


@dataclass(frozen=True)
class DataSpec:
    """Task, input shape (one sample, no batch dimension) and number of outputs.

    `input_shape` is (C, H, W) for images, (T, F) for sequences and (F,) for flat vectors; `kind`
    names which. `per_step` marks targets at every time step (language models: many-to-many).
    `vocab_size` is set when the inputs are token indices rather than numbers. A model of INPUT_TASKS
    (autoencoder, vae) replaces `task` and keeps `class_names`, which colour its latent space and train the
    sample-quality classifier.
    """

    name: str
    task: str
    input_shape: tuple[int, ...]
    num_outputs: int
    class_names: tuple[str, ...] = ()
    per_step: bool = False
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS + INPUT_TASKS:
            raise ValueError(f"task must be one of {TASKS + INPUT_TASKS}, not {self.task!r}")
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
        if self.task in INPUT_TASKS:  # the output is the input's shape
            return f"{self.name} ({self.kind} {shape}, {self.task})"
        return f"{self.name} ({self.kind} {shape}, {self.task}, {self.num_outputs} outputs)"
