"""The workload registry: what a workload declares (`WorkloadSpec`) and which workload trains a run.

A spec is light (it imports neither torch nor transformers): its settings section, its commands and the
"module:Class" of its `Workload`, imported only when a run is built. config.yaml's sections, the generated
options of `peftlab train` / `peftlab eval`, the section checks and the command line all iterate the registered
specs, so a workload from outside peftlab is one `register_workload(spec)` call away from being a full citizen.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable

from peftlab.data.datasets import objective_of
from peftlab.errors import PeftlabError

CHOSEN_BY = ("objective", "section")


@dataclass(frozen=True)
class Command:
    """A subcommand of `peftlab`. `arguments` adds its options to its parser (a function or "module:function" of a
    module that imports nothing heavy, so `peftlab --help` stays fast); `run` is called with the parsed arguments
    (a function or "module:function", imported only when the command runs). `writes_runs`: it writes run
    directories (a write failure then says what the run directory keeps)."""

    name: str
    help: str
    arguments: str | Callable[[argparse.ArgumentParser], None]
    run: str | Callable[[argparse.Namespace], None]
    description: str | None = None
    writes_runs: bool = False

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        resolve_reference(self.arguments)(parser)

    def handler(self) -> Callable[[argparse.Namespace], None]:
        return resolve_reference(self.run)


@dataclass(frozen=True)
class WorkloadSpec:
    """What a workload declares.

    Attributes:
        name: the workload's name; for `chosen_by="objective"` also the objective a dataset offers.
        workload: its `peftlab.workloads.base.Workload` subclass, or "module:Class" (imported when a run is built).
        settings: the dataclass of its config.yaml section (named `name`; fields declared with
            `peftlab.settings.setting`), or None when it has no settings of its own.
        chosen_by: "objective": trains the runs whose task's objective is `name`; "section": trains the runs whose
            config has its section (a distillation: its teacher).
        train_options: its section's settings are options of `peftlab train` (else only of its own commands).
        commands: its subcommands of `peftlab`.
        upgrade_v1: moves its settings out of a version-1 config mapping (no `version` key) into today's place.
    """

    name: str
    workload: str | type
    settings: type | None = None
    chosen_by: str = "objective"
    train_options: bool = True
    commands: tuple[Command, ...] = ()
    upgrade_v1: Callable[[dict], None] | None = None

    def __post_init__(self):
        if self.chosen_by not in CHOSEN_BY:
            raise PeftlabError(f"workload {self.name}: chosen_by must be one of {', '.join(CHOSEN_BY)}, "
                               f"got '{self.chosen_by}'")
        if self.settings is not None and not dataclasses.is_dataclass(self.settings):
            raise PeftlabError(f"workload {self.name}: settings must be a dataclass, got {self.settings!r}")


RESERVED = ("output_dir", "model", "adapter", "task", "train", "version", "environment", "sections")
_REGISTRY: dict[str, WorkloadSpec] = {}
_INSTANCES: dict[str, object] = {}


def register_workload(spec: WorkloadSpec) -> WorkloadSpec:
    """Add a workload; its name must be new and must not be one of config.yaml's own sections."""
    if spec.name in _REGISTRY or spec.name in RESERVED:
        raise PeftlabError(f"a workload named '{spec.name}' is registered already (or the name is one of config.yaml's "
                           f"own: {', '.join(RESERVED)}); choose another name")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_workload(name: str) -> None:
    """Remove a workload (a test's own, when the test ends)."""
    _REGISTRY.pop(name, None)
    _INSTANCES.pop(name, None)


def registered_workloads() -> tuple[WorkloadSpec, ...]:
    return tuple(_REGISTRY.values())


def workload_spec(name: str) -> WorkloadSpec:
    if name not in _REGISTRY:
        raise PeftlabError(f"unknown workload '{name}': registered are {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def section_types() -> dict[str, type]:
    """config.yaml's workload sections: name -> settings dataclass, in registration order."""
    return {spec.name: spec.settings for spec in _REGISTRY.values() if spec.settings is not None}


def spec_for(config) -> WorkloadSpec:
    """The workload that trains `config` (a `peftlab.config.RunConfig`): one chosen by its section when the config
    has that section, else the one named by the task's objective."""
    for spec in _REGISTRY.values():
        if spec.chosen_by == "section" and config.sections.get(spec.name) is not None:
            return spec
    objective = objective_of(config.task.name, config.task.objective)
    spec = _REGISTRY.get(objective)
    if spec is None or spec.chosen_by != "objective":
        raise PeftlabError(f"no registered workload trains the objective '{objective}' (registered: "
                           f"{', '.join(_REGISTRY)})")
    return spec


def workload_of(spec: WorkloadSpec):
    """The spec's `Workload` instance (its class imported the first time it is needed)."""
    if spec.name not in _INSTANCES:
        _INSTANCES[spec.name] = resolve_reference(spec.workload)()
    return _INSTANCES[spec.name]


def resolve_reference(reference):
    """An object, or the object a "module:attribute" string names (imported now)."""
    if not isinstance(reference, str):
        return reference
    module, separator, attribute = reference.partition(":")
    if not separator:
        raise PeftlabError(f"'{reference}' is not a 'module:attribute' reference")
    return getattr(importlib.import_module(module), attribute)
