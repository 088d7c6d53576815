"""Tasks turn examples into batches, losses, predictions and metrics; the training engine knows them only
through the `Task` protocol below. A task may build on a shared objective (instruct and qa on the causal-LM
objective of `completion`), never on another task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: what the batches are made of."""

    input_ids: list[int]
    target: Any  # a class index, or whatever the task predicts
    origin: str  # file:line of the source example
    shared_length: int = 0  # leading tokens other examples may start with too (a SQuAD context), computed once

    @property
    def length(self) -> int:
        return len(self.input_ids)


TaskSum = tuple[torch.Tensor | float, float]  # (a quantity summed over a batch, what it is a sum over)


@dataclass
class StepOutput:
    """What a task's `forward` returns for one batch.

    `sums` are the task's own quantities (e.g. DPO's chosen and rejected rewards, accuracies, margins), each a
    (sum, count) pair over the batch. The engine adds sums and counts over micro-batches, processes and steps and
    writes the mean, Σ sum / Σ count, under the name: in steps.jsonl (per optimizer step), in metrics.jsonl (as
    `train_<name>` over the epoch, `val_<name>` over an evaluation) and to the trackers. A task returns the same
    names for every batch.
    """

    loss_sum: torch.Tensor  # summed over the batch's targets (examples or answer tokens)
    num_targets: int  # what loss_sum is a sum over: the engine normalises by the step's total
    predictions: list | None  # one per example; None when the task predicts separately (`predict`)
    num_correct: int  # targets predicted right (examples, or answer tokens under teacher forcing)
    sums: dict[str, TaskSum] = field(default_factory=dict)  # name -> (sum, count): the task's own quantities


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of rows padded on the right to the longest one (dynamic padding)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, : len(row)] = 1
    return input_ids, attention_mask


class Task:
    """What the training engine knows of a workload: the one protocol every task implements.

    A task owns its data (encode), batching (collate), loss (forward), predictions and metrics. The engine
    normalises the summed loss by `count_targets` over the whole global batch, so gradient accumulation and
    several processes give the gradients of the mean loss. `evaluate` frames every evaluation with
    `begin_evaluation` / `end_evaluation`. Subclasses override what their workload needs; the defaults below are
    for tasks that predict in `forward`, score examples as a whole, skip nothing and share nothing over an
    evaluation.
    """

    name: str  # the dataset, e.g. "cola"
    model_task: str  # what `load_model(task=...)` builds: "classification" or "causal-lm"
    select_metric_default: str  # the validation metric that picks checkpoints/best
    metric_names: tuple[str, ...]  # validation metrics that may pick checkpoints/best (higher is better); loss too
    test_split: str | None = None  # scored with checkpoints/best when training ends (None: validation is the test)
    # True: examples with the same first `shared_length` tokens are batched together (never split over processes
    # or micro-batches) and the task computes that prefix once for all of them (`peftlab.shared_prefix`).
    shares_prefixes: bool = False
    # True when encoding computes something (a distillation's teacher labels the data): --dry-run then plans
    # without reading the data.
    encoding_is_costly: bool = False

    def encode(self, split: str) -> list[Encoded]:
        """Every usable example of a split; bad data is an error naming file and line."""
        raise NotImplementedError

    def collate(self, examples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """One padded batch: the model's inputs and whatever `forward` and `count_targets` need."""
        raise NotImplementedError

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """What `forward`'s loss_sum is a sum over in this batch (examples, or labelled tokens)."""
        raise NotImplementedError

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        """Summed loss over the batch's targets, and predictions when they come from the same pass."""
        raise NotImplementedError

    def begin_evaluation(self, model: torch.nn.Module, examples: Sequence[Encoded]) -> None:
        """Called by `engine.evaluate` before its first batch, in inference mode, with every example of the
        evaluation (the same list on every process): compute here what all batches share, once (a prefix cache of
        few-shot demonstrations, a calibration pass). Nothing by default."""

    def end_evaluation(self) -> None:
        """Called after the evaluation's last batch, also when it failed: drop what `begin_evaluation` kept."""

    def predict(self, model: torch.nn.Module, examples: Sequence[Encoded]) -> list:
        """Predictions that need their own pass (generation); called when forward's predictions are None."""
        raise NotImplementedError(f"{type(self).__name__} predicts in forward()")

    def metrics(self, predictions: list, examples: Sequence[Encoded]) -> dict:
        """The split's metrics from every example's prediction (the engine adds loss and examples/s)."""
        raise NotImplementedError

    def format_metrics(self, metrics: dict) -> str:
        """One line for the log."""
        raise NotImplementedError

    def reference(self, example: Encoded) -> Any:
        """What a prediction of `example` is compared with, for the predictions file."""
        return example.target

    def example_metrics(self, prediction: Any, example: Encoded) -> dict:
        """Scores of one prediction (e.g. SQuAD's EM/F1), for the predictions file; none by default."""
        return {}

    @property
    def skipped(self) -> dict[str, int]:
        """Per split, examples that could not be encoded and were left out (reported in summary.json)."""
        return {}
