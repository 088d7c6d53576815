"""What a workload is: a plug-in that builds a run's task and model from its configuration.

The registry (`peftlab.workloads.registry`) says which workload trains a run; `peftlab.data.datasets` says which
objectives each dataset offers. A workload never imports another one: what two of them share lives a floor
below (the causal-LM objective in `peftlab.tasks.completion`, metrics in `peftlab.tasks.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from peftlab.config import RunConfig
from peftlab.data.datasets import get_dataset, objective_of
from peftlab.models import load_model, load_tokenizer
from peftlab.peft import apply_method
from peftlab.tasks import Task

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
                              **self.model_options(task))
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
