"""Instruction tuning with generated labels (W3): the `instruct` settings section, the `templates` command and the
workload's spec. The task and workload (`workload`) are imported only when a run is built."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from peftlab.data.datasets import DATASETS
from peftlab.settings import setting
from peftlab.workloads.instruct.templates import DEFAULT_VERBALIZERS, TEMPLATES
from peftlab.workloads.registry import Command, WorkloadSpec

PREDICT_MODES = ("generate", "score", "both")


@dataclass
class InstructConfig:
    """The instruct workload's own settings: how a label becomes a prompt and an answer, and how it is predicted."""

    template: str | None = setting(None, "instruct prompt: a name from `peftlab templates` or a format string with "
                                   "{text} (\\n = newline)", default_text="the task's first", legacy_unset="",
                                   evaluation="zero-shot")
    verbalizers: list[str] | None = setting(None, "instruct: comma-separated answer text per label, in label order",
                                            default_text="the task's, else the label names", legacy_unset=[],
                                            evaluation="zero-shot")
    predict: str = setting("generate", "instruct: generate (greedy, parse the text) | score (likelihood of each "
                           "verbalizer) | both", evaluation="any")


def upgrade_v1(values: dict) -> None:
    """Before version 2 the instruct settings lived in the task section (of every run)."""
    task = values.get("task") if isinstance(values.get("task"), dict) else {}
    moved = {key: task.pop(key) for key in ("template", "verbalizers", "predict") if key in task}
    dataset = DATASETS.get(task.get("name", "cola"), DATASETS["cola"])
    if moved and (task.get("objective") or dataset.default_objective) == "instruct":
        values["instruct"] = moved


def list_templates(args: argparse.Namespace) -> None:
    for task, dataset in DATASETS.items():
        objectives = dataset.objectives
        print(f"{task}: objectives {', '.join(objectives)} (default: {objectives[0]})")
        for index, (name, text) in enumerate(TEMPLATES.get(task, {}).items()):
            print(f"  template {name}{' (default)' if index == 0 else ''}: {text!r}")
        if task in TEMPLATES:
            verbalizers = DEFAULT_VERBALIZERS.get(task)
            print(f"  verbalizers: {', '.join(verbalizers) if verbalizers else 'the label names'}")
    print("Your own template: --template 'TEXT {text} TEXT' (\\n = newline); the answer follows after one space "
          "unless the template ends in whitespace.")


SPEC = WorkloadSpec(
    name="instruct",
    workload="peftlab.workloads.instruct.workload:InstructWorkload",
    settings=InstructConfig,
    upgrade_v1=upgrade_v1,
    commands=(Command("templates", "list tasks, objectives, prompt templates and verbalizers",
                      arguments=lambda parser: None, run=list_templates),),
)
