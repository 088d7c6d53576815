"""Sequence classification (CoLA, W1): a head on the last real token, cross-entropy, accuracy / MCC / label counts.

Matthews correlation is CoLA's official metric: a model that always answers "acceptable" scores ~69% accuracy
on the dev set but MCC 0, and the predicted-label counts make that visible.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from peftlab.data import LabelledText
from peftlab.errors import PeftlabError
from peftlab.tasks import Encoded, StepOutput, Task, right_pad
from peftlab.tasks.metrics import classification_metrics
from peftlab.workloads.base import Workload, classifier_details, classifier_records, tokens_within


class ClassificationTask(Task):
    model_task = "classification"
    select_metric_default = "mcc"
    metric_names = ("accuracy", "mcc")

    def __init__(
        self,
        name: str,
        label_names: Sequence[str],
        read_split: Callable[[str], list[LabelledText]],
        tokenizer,
        max_length: int,
    ):
        self.name = name
        self.label_names = tuple(label_names)
        self.read_split = read_split
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def encode(self, split: str) -> list[Encoded]:
        examples = self.read_split(split)
        token_ids = self.tokenizer([example.text for example in examples], add_special_tokens=False)["input_ids"]
        encoded = []
        for example, ids in zip(examples, token_ids):
            if len(ids) > self.max_length:
                raise PeftlabError(
                    f"{example.origin}: {len(ids)} tokens, more than --max-length {self.max_length}. "
                    "Fix: raise --max-length (nothing is cut silently)."
                )
            if not 0 <= example.label < self.num_labels:
                raise PeftlabError(f"{example.origin}: label {example.label} is not one of 0..{self.num_labels - 1}")
            encoded.append(Encoded(ids, example.label, example.origin))
        return encoded

    def collate(self, examples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example of the batch (dynamic padding)."""
        input_ids, attention_mask = right_pad([example.input_ids for example in examples], self.tokenizer.pad_token_id)
        labels = torch.tensor([example.target for example in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, num_labels)
        loss_sum = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        predictions = logits.argmax(-1)
        return StepOutput(loss_sum, len(batch["labels"]), predictions.tolist(), int((predictions == batch["labels"]).sum()))

    def metrics(self, predictions: list, examples: Sequence[Encoded]) -> dict:
        return classification_metrics(predictions, [example.target for example in examples], self.label_names)

    def format_metrics(self, metrics: dict) -> str:
        counts = ", ".join(f"{name}: {count}" for name, count in metrics["predicted_counts"].items())
        return f"Accuracy: {metrics['accuracy']:.4f}, MCC: {metrics['mcc']:.4f}, predicted [{counts}]"


class ClassificationWorkload(Workload):
    """A classifier head on the last real token of a transformer (CoLA, W1; Rotten Tomatoes as a classifier)."""

    name = "classification"
    default_extra_trainable = ("head",)  # a random head must learn

    def task_for(self, config, tokenizer) -> ClassificationTask:
        return self.labelled_task(ClassificationTask, config, tokenizer)

    def build_model(self, config, task, device, fresh, context):
        model = super().build_model(config, task, device, fresh, context)
        if not any(parameter.requires_grad for parameter in model.score.parameters()):
            print("warning: the classifier head is frozen at its random initialisation; add 'head' to --extra-trainable")
        return model

    def model_options(self, task: ClassificationTask) -> dict:
        return {"num_labels": task.num_labels}

    def encode_input(self, task: ClassificationTask, fields, origin) -> Encoded:
        return Encoded(tokens_within(task.tokenizer, fields["text"], task.max_length, origin), -1, origin)

    def predict_examples(self, task, model, examples) -> list[dict]:
        return classifier_records(task, model, examples, task.label_names)

    def prediction_details(self, task, model, examples) -> list[dict]:
        return classifier_details(task, model, examples, task.label_names)

