"""DataSpec: what a data set tells the model. Models are built from it, never from the data set's name."""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("multiclass", "binary", "regression")


@dataclass(frozen=True)
class DataSpec:
    """Task, input shape (one sample, no batch dimension) and number of outputs.

    `input_shape` is (C, H, W) for images, (T, F) for sequences and (F,) for flat vectors; `kind`
    names which. `per_step` marks targets at every time step (language models: many-to-many).
    `vocab_size` is set when the inputs are token indices rather than numbers.
    """

    name: str
    task: str
    input_shape: tuple[int, ...]
    num_outputs: int
    class_names: tuple[str, ...] = ()
    per_step: bool = False
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")
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
        return f"{self.name} ({self.kind} {shape}, {self.task}, {self.num_outputs} outputs)"
