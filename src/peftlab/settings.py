"""`setting`: a documented settings field. Every settings dataclass (a run's sections in `peftlab.config`, each
workload's own section, sampling) declares its fields with it, and the command line, config.yaml's checks and
`--help` are generated from that metadata, so no name, default or help text is written twice.
`expand_escapes` is how every command reads \\n, \\t and \\\\ in a text given on the command line.

This module imports nothing of peftlab's, so a workload's light package can declare its section with it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field

NOT_LEGACY = dataclasses.MISSING


def setting(default, help: str, option: str | None = None, default_text: str | None = None,
            legacy_unset=NOT_LEGACY, evaluation: str | None = None):
    """A documented field.

    Args:
        default: its default (a list is copied per instance).
        help: its one line on the command line.
        option: its CLI name when that is not the field's own (`--lora-dropout` for adapter.dropout).
        default_text: describes a None default (e.g. "the task's own").
        legacy_unset: for a None default that a run resolves when it starts ("the task's own"): the value
            version-1 config files used for it ("", 0 or []). Marks the field as resolved when a run starts.
        evaluation: also an option of `peftlab eval`: "zero-shot" (describes the un-tuned model evaluated without
            a RUN_DIR) or "any" (also changes how a run is evaluated, e.g. the prediction mode).
    """
    metadata = {"help": help, "option": option, "default_text": default_text, "legacy_unset": legacy_unset,
                "evaluation": evaluation}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def resolved_when_run_starts(item: dataclasses.Field) -> bool:
    """Whether a field's None means "the task's own", filled in when a run starts (see `setting`)."""
    return item.metadata.get("legacy_unset", NOT_LEGACY) is not NOT_LEGACY


ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def expand_escapes(text: str) -> str:
    """A command-line text with \\n (newline), \\t (tab) and \\\\ (one backslash) expanded; any other backslash stays."""
    return re.sub(r"\\([nt\\])", lambda match: ESCAPES[match.group(1)], text)
