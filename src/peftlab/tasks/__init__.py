"""Tasks turn examples into batches, losses, predictions and metrics; the training engine knows them only
through the small `Task` interface below. Tasks never import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: what the batches are made of."""

    input_ids: list[int]
    target: Any  # a class index, or whatever the task predicts
    origin: str  # file:line of the source example

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # summed over the batch's targets (examples or answer tokens)
    num_targets: int  # what loss_sum is a sum over: the engine normalises by the step's total
    predictions: list  # one per example


class Task(Protocol):
    name: str
    model_task: str  # what `load_model(task=...)` must build: "classification" or "causal-lm"
    select_metric_default: str

    def encode(self, split: str) -> list[Encoded]: ...

    def collate(self, examples: Sequence[Encoded]) -> dict[str, torch.Tensor]: ...

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput: ...

    def metrics(self, predictions: list, examples: Sequence[Encoded]) -> dict: ...

    def format_metrics(self, metrics: dict) -> str: ...


def get_task(name: str, tokenizer, data_dir: str | None, max_length: int) -> Task:
    """The task called `name`, reading its data from `data_dir` (or $PEFTLAB_DATA)."""
    from peftlab.errors import PeftlabError

    if name == "cola":
        from peftlab.tasks.classification import cola_task

        return cola_task(tokenizer, data_dir, max_length)
    raise PeftlabError(f"unknown task '{name}': expected one of cola")
