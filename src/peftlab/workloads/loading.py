"""Building a run's task and model, new or saved, through the workload registry (`peftlab.workloads.registry`):
the run service and the commands call these and never name a workload."""

from __future__ import annotations

import torch
from torch import nn

from peftlab.config import RunConfig
from peftlab.data.datasets import objective_of
from peftlab.errors import PeftlabError
from peftlab.models import resolve_device
from peftlab.options import settings_options
from peftlab.runs import RunDir
from peftlab.tasks import Task
from peftlab.workloads.base import Context, Workload
from peftlab.workloads.registry import spec_for, workload_of, workload_spec


def workload_for(config: RunConfig) -> Workload:
    """The workload that trains `config`, its own section checked (see `check_sections`)."""
    spec = spec_for(config)
    check_sections(config, spec.name)
    return workload_of(spec)


def check_sections(config: RunConfig, workload: str) -> None:
    """Another workload's settings section is a mistake, not something to ignore; the run's own workload's section
    is added with its defaults when absent (resolved with the rest when the run starts)."""
    for name in config.sections:
        if name != workload:
            flags = ", ".join(option.flag for option in settings_options((name,)).values())
            raise PeftlabError(f"{flags} (the {name} section) apply to {name} runs; this {config.task.name} run trains "
                               f"with workload {workload}")
    settings = workload_spec(workload).settings
    if settings is not None and config.sections.get(workload) is None:
        config.sections[workload] = settings()


def get_task(config: RunConfig, tokenizer) -> Task:
    """The task of the config's dataset with its objective, whatever else the config holds (how a distillation
    reaches its teacher's task)."""
    return workload_of(workload_spec(objective_of(config.task.name, config.task.objective))).task_for(config, tokenizer)


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
