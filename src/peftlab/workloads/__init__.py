"""The workload registry: which workload trains a run, and building a run's task and model (new or saved).

A run is a distillation when its config has a `distill` section (its teacher); otherwise its dataset and objective
(`peftlab.data.datasets`) choose the workload. Adding a workload is one module with a `Workload` subclass and one
entry in `WORKLOADS`.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.config import RunConfig
from peftlab.data.datasets import objective_of
from peftlab.errors import PeftlabError
from peftlab.models import resolve_device
from peftlab.runs import RunDir
from peftlab.tasks import Task
from peftlab.workloads.base import Context, Workload
from peftlab.workloads.classification import ClassificationWorkload
from peftlab.workloads.distill import DistillWorkload
from peftlab.workloads.instruct import InstructWorkload
from peftlab.workloads.qa import QAWorkload

WORKLOADS: dict[str, Workload] = {workload.name: workload for workload in (
    ClassificationWorkload(),
    InstructWorkload(),
    QAWorkload(),
    DistillWorkload(),
)}


def workload_for(config: RunConfig) -> Workload:
    if config.distill is not None:
        return WORKLOADS["distill"]
    return WORKLOADS[objective_of(config.task.name, config.task.objective)]


def get_task(config: RunConfig, tokenizer) -> Task:
    """The task of the config's dataset with its objective (classification, instruct or qa)."""
    workload = WORKLOADS[objective_of(config.task.name, config.task.objective)]
    workload.check_sections(config)
    return workload.task_for(config, tokenizer)


def build_task(config: RunConfig) -> Task:
    """The run's task; the config's settings left at None are then resolved to the values it uses (in place)."""
    workload = workload_for(config)
    task = workload.build_task(config, CONTEXT)
    workload.resolve(config, task)
    return task


def build_model(config: RunConfig, task: Task, device: torch.device, fresh: bool = False) -> nn.Module:
    """The run's model before any checkpoint is loaded; the seed is set first, so a random-init base is rebuilt
    exactly. `fresh`: see `Workload.build_model`."""
    torch.manual_seed(config.train.seed)
    return workload_for(config).build_model(config, task, device, fresh, CONTEXT)


def load_run(run_dir: str, checkpoint: str = "best", config: RunConfig | None = None) -> tuple[RunConfig, Task, nn.Module]:
    """Rebuild a run's model with its checkpoint (`best` or `last`) loaded; returns (config, task, model).

    `config`: the run's config.yaml as the caller read and adjusted it (e.g. another prediction mode)."""
    run = RunDir(run_dir)
    config = config or run.read_config()
    if not run.checkpoint(checkpoint).is_dir():
        raise PeftlabError(f"{run} has no checkpoint '{checkpoint}' (expected {run.checkpoint(checkpoint)})")
    device, _ = resolve_device(config.train.device)
    task = build_task(config)
    model = build_model(config, task, device)
    run.load_checkpoint(model, checkpoint, config.model.name)
    return config, task, model


CONTEXT = Context(load_run=load_run, task_for=get_task)
