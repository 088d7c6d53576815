"""Command-line options generated from the settings dataclasses (`peftlab.settings.setting`): each documented field's
name (or its `option`), type, default and one-line help become one option, so none of these is written twice.
The registered workloads' sections are included as they are registered (the option tables are functions).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass

from peftlab.config import CORE_SECTIONS, RunConfig, all_sections
from peftlab.sampling import Sampling
from peftlab.workloads.registry import registered_workloads


@dataclass(frozen=True)
class Option:
    section: str | None  # the RunConfig section the field lives in; None: a flat settings dataclass
    field: dataclasses.Field
    hint: object

    @property
    def flag(self) -> str:
        return "--" + (self.field.metadata.get("option") or self.field.name.replace("_", "-"))

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def kind(self):
        """The field's type without `| None`."""
        if typing.get_origin(self.hint) in (typing.Union, types.UnionType):
            return next(item for item in typing.get_args(self.hint) if item is not type(None))
        return self.hint

    def default_text(self, default=dataclasses.MISSING) -> str:
        if default is dataclasses.MISSING:
            factory = self.field.default_factory
            default = factory() if factory is not dataclasses.MISSING else self.field.default
        if default is None:
            return self.field.metadata.get("default_text") or "none"
        if isinstance(default, bool):
            return "yes" if default else "no"
        if isinstance(default, list):
            return ",".join(default) or "none"
        return f"{default:g}" if isinstance(default, float) else (str(default) or "none")


def documented_fields(cls, section: str | None) -> dict[str, Option]:
    hints = typing.get_type_hints(cls)
    options = [Option(section, item, hints[item.name]) for item in dataclasses.fields(cls) if "help" in item.metadata]
    return {option.dest: option for option in options}


def settings_options(sections: tuple[str, ...]) -> dict[str, Option]:
    """dest -> Option for every documented field of these config.yaml sections (core or a workload's), in order."""
    types_ = all_sections()
    options: dict[str, Option] = {}
    for section in sections:
        for dest, option in documented_fields(types_[section], section).items():
            if dest in options:  # one flag cannot set two sections' fields: a workload must name its setting apart
                raise ValueError(f"option {option.flag} is declared by two sections: {options[dest].section} and "
                                 f"{section}")
            options[dest] = option
    return options


def add_options(parser: argparse.ArgumentParser, options: dict[str, Option], defaults: dict | None = None,
                 prefix: str = "") -> None:
    """One argument per option; every default is None so only given options change a configuration."""
    for dest, option in options.items():
        default = (defaults or {}).get(option.field.name, dataclasses.MISSING)
        text = f"{prefix}{option.field.metadata['help']} (default: {option.default_text(default)})"
        if option.kind is bool:
            parser.add_argument(option.flag, dest=dest, action=argparse.BooleanOptionalAction, help=text)
        elif typing.get_origin(option.kind) is list:
            parser.add_argument(option.flag, dest=dest, metavar="A,B", help=text)
        else:
            parser.add_argument(option.flag, dest=dest, type=option.kind, help=text)


def apply_options(target, args: argparse.Namespace, options: dict[str, Option]) -> None:
    """Set every given option on `target` (a RunConfig, or the flat settings object the options come from)."""
    for dest, option in options.items():
        value = getattr(args, dest)
        if value is not None:
            if typing.get_origin(option.kind) is list:
                value = [item.strip() for item in value.split(",") if item.strip()]
            setattr(_section(target, option.section) if option.section else target, option.field.name, value)


def _section(config: RunConfig, name: str):
    """A config section, created with its defaults when an option of a workload's own section is given."""
    if getattr(config, name) is None:
        setattr(config, name, all_sections()[name]())
    return getattr(config, name)


def train_options() -> dict[str, Option]:
    """The options of `peftlab train`: the task, the sections of the workloads that take theirs there, then the model,
    adapter and training settings."""
    workloads = tuple(spec.name for spec in registered_workloads() if spec.settings is not None and spec.train_options)
    return settings_options(("task", *workloads, "model", "adapter", "train"))


def eval_options(scope: str) -> dict[str, Option]:
    """The settings `peftlab eval` takes: scope "zero-shot" (describing the un-tuned model evaluated without RUN_DIR)
    or "any" (also changing how a run is evaluated)."""
    scopes = ("zero-shot", "any") if scope == "zero-shot" else ("any",)
    evaluated = tuple(name for name, type_ in all_sections().items()
                      if any(field.metadata.get("evaluation") in scopes for field in dataclasses.fields(type_)))
    return {dest: option for dest, option in settings_options(evaluated).items()
            if option.field.metadata.get("evaluation") in scopes}


def sampling_options() -> dict[str, Option]:
    """The options of every command that samples text (`peftlab generate`, `peftlab transfer-set`, ...)."""
    return documented_fields(Sampling, None)


# Where a run is evaluated or exported now, instead of where its config.yaml says it ran.
RUN_PLACE_OPTIONS = {dest: option for dest, option in settings_options(CORE_SECTIONS).items()
                     if dest in ("device", "data_dir")}
