"""What a workload is: a plug-in that builds a run's task and model from its configuration.

The registry (`peftlab.workloads.registry`) says which workload trains a run; `peftlab.data.datasets` says which
objectives each dataset offers. A workload never imports another one: what two of them share lives a floor
below (the causal-LM objective in `peftlab.tasks.completion`, metrics in `peftlab.tasks.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

from peftlab.config import RunConfig
from peftlab.data.datasets import get_dataset, objective_of
from peftlab.errors import PeftlabError
from peftlab.models import load_model, load_tokenizer
from peftlab.peft import apply_method
from peftlab.tasks import Encoded, Task

# (run_dir, checkpoint) -> (config, task, model): how a workload reaches another run (a distillation's teacher).
RunLoader = Callable[[str, str], tuple[RunConfig, Task, nn.Module]]


@dataclass(frozen=True)
class Context:
    """What the registry gives a workload that builds on other runs or tasks (workloads never import each other)."""

    load_run: RunLoader
    task_for: Callable[[RunConfig, object], Task]  # (config, tokenizer) -> its dataset's task


class Workload:
    """A kind of training. The defaults fine-tune a transformer from `models.load_model` with the run's method."""

    name: ClassVar[str]  # the objective, e.g. "classification"
    not_exportable: ClassVar[str] = ""  # why `peftlab export` cannot write its models ("" = it can)
    default_extra_trainable: ClassVar[tuple[str, ...]] = ()  # what trains besides the method when not given

    def task_for(self, config: RunConfig, tokenizer) -> Task:
        """The task of the config's dataset trained with this objective."""
        raise NotImplementedError

    def build_task(self, config: RunConfig, context: Context) -> Task:
        return self.task_for(config, load_tokenizer(config.model.name))

    def build_model(self, config: RunConfig, task: Task, device: torch.device, fresh: bool,
                    context: Context) -> nn.Module:
        """The run's model before any checkpoint is loaded. `fresh`: a new run, whose initial weights may come
        from elsewhere (a student's embedding from its teacher); a resumed or reloaded run skips that work."""
        model = self.base_model(config, task, torch.float32)
        apply_method(model, config.adapter)
        return model.to(device)

    def base_model(self, config: RunConfig, task: Task, dtype: torch.dtype) -> nn.Module:
        """The un-tuned model (no method applied): what a run starts from, and what a zero-shot evaluation scores."""
        model, _ = load_model(config.model.name, task=task.model_task, init=config.model.init, dtype=dtype,
                              dropout=config.model.dropout, **self.model_options(task))
        return model

    def resolve(self, config: RunConfig, task: Task) -> None:
        """Fill in the settings left at None ("the task's own") with the values this run uses, in place."""
        settings = config.task
        settings.objective = objective_of(settings.name, settings.objective)
        settings.max_length = settings.max_length or get_dataset(settings.name).max_length
        config.train.select_metric = config.train.select_metric or task.select_metric_default
        if config.adapter.extra_trainable is None:
            config.adapter.extra_trainable = list(self.default_extra_trainable)

    def labelled_task(self, task_class, config: RunConfig, tokenizer, *options):
        """A task over a labelled dataset (classification, instruct): `task_class(name, label names, split reader,
        tokenizer, max length, *options)`, with the dataset's test split."""
        settings = config.task
        dataset = get_dataset(settings.name)
        task = task_class(dataset.name, dataset.label_names, lambda split: dataset.read(split, settings.data_dir),
                          tokenizer, settings.max_length or dataset.max_length, *options)
        task.test_split = dataset.test_split
        return task

    def model_options(self, task: Task) -> dict:
        """Extra arguments of `load_model` for this workload's tasks (a classifier's number of labels)."""
        return {}

    # Prediction on a user's own inputs (`peftlab predict`, `peftlab.load_run`) and the run's prompt format
    # (`peftlab generate --model RUN_DIR`). An input is a dict of `input_fields` -> text; a workload that predicts
    # implements `encode_input` and `predict_examples` (and `prompt_text` when its model generates text).

    input_fields: ClassVar[tuple[str, ...]] = ("text",)  # what one input holds (the JSONL fields of `predict`)

    def input_from_text(self, text: str, origin: str) -> dict[str, str]:
        """One input given as a single text (`--text`, a line of a text file, a `generate` prompt)."""
        return {"text": text}

    def encode_input(self, task: Task, fields: dict[str, str], origin: str) -> Encoded:
        """The example the run's model reads for one input (the run's template, tokenizer and max length); an input
        that does not fit is an error naming `origin` (nothing is cut silently)."""
        raise PeftlabError(f"{self.name} runs cannot predict on inputs of your own (their workload has no "
                           "encode_input)")

    def predict_examples(self, task: Task, model: nn.Module, examples: Sequence[Encoded]) -> list[dict]:
        """Per example (from `encode_input`), in inference mode, its record: "prediction" (a label name, or the
        generated answer) and what else the prediction is made of (`prediction_details`)."""
        raise PeftlabError(f"{self.name} runs cannot predict on inputs of your own (their workload has no "
                           "predict_examples)")

    def prediction_details(self, task: Task, model: nn.Module, examples: Sequence[Encoded]) -> list[dict]:
        """What a prediction file adds to each example's prediction besides the label or answer (a classifier's
        label names and probabilities); nothing by default."""
        return [{} for _ in examples]

    def prompt_text(self, task: Task, fields: dict[str, str]) -> str:
        """The text the run's language model was trained to continue for one input (its prompt template)."""
        raise PeftlabError(f"{self.name} runs have no prompt format: generate needs a language-model run (instruct "
                           "or qa)")

    def split_inputs(self, task: Task, split: str) -> dict[str, str | dict[str, str]]:
        """A split's inputs by origin (file:line), in the form `predict` takes them: what an evaluation's
        predictions file shows as each example's input. Labelled tasks read the text of `task.read_split`."""
        return {example.origin: example.text for example in task.read_split(split)}


def tokens_within(tokenizer, text: str, max_length: int, origin: str) -> list[int]:
    """A classifier's input tokens: at least one (its head reads the last), at most the run's max length."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PeftlabError(f"{origin}: the input is empty; a classifier needs some text")
    if len(ids) > max_length:
        raise PeftlabError(f"{origin}: {len(ids)} tokens, more than the run's max length {max_length}. Fix: shorten "
                           "the input (nothing is cut silently)")
    return ids


def classifier_logits(task: Task, model: nn.Module, examples: Sequence[Encoded]) -> torch.Tensor:
    """(B, num_labels) fp32 logits of a classifier task's examples, one batch of `task.collate`."""
    batch = task.collate(examples)
    device = next(model.parameters()).device
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).float()


def classifier_details(task: Task, model: nn.Module, examples: Sequence[Encoded],
                       label_names: Sequence[str]) -> list[dict]:
    """A classifier's label names and probabilities (the softmax of the logits the evaluation's argmax reads)."""
    return [{"label_names": list(label_names), "probabilities": row}
            for row in classifier_logits(task, model, examples).softmax(-1).tolist()]


def classifier_records(task: Task, model: nn.Module, examples: Sequence[Encoded],
                       label_names: Sequence[str]) -> list[dict]:
    """A classifier's records: the argmax of its logits (as in evaluation), label names and probabilities."""
    logits = classifier_logits(task, model, examples)
    return [label_record(label, {"label_names": list(label_names), "probabilities": row})
            for label, row in zip(logits.argmax(-1).tolist(), logits.softmax(-1).tolist())]


def label_record(label: int, details: dict) -> dict:
    """A record whose prediction is a label: its name (None for an unparsable generation), its index, then the
    details (label names, probabilities)."""
    names = details["label_names"]
    return {"prediction": names[label] if 0 <= label < len(names) else None, "label": label} | details
