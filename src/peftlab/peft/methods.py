"""The registry of adapter methods: a new method is one file implementing `AdapterMethod` and one line here."""

from __future__ import annotations

from typing import Any

from peftlab.errors import PeftlabError
from peftlab.peft.base import AdapterMethod, read_setting
from peftlab.peft.bottleneck import BottleneckMethod
from peftlab.peft.dora import DoRAMethod
from peftlab.peft.ia3 import IA3Method
from peftlab.peft.lora import LoRAMethod
from peftlab.peft.prefix import PrefixMethod
from peftlab.peft.simple import BitFitMethod, FullMethod, HeadMethod

METHODS: dict[str, AdapterMethod] = {method.name: method for method in (
    LoRAMethod(),
    FullMethod(),
    BitFitMethod(),
    HeadMethod(),
    IA3Method(),
    DoRAMethod(),
    BottleneckMethod(),
    PrefixMethod(),
)}


def get_method(name: str) -> AdapterMethod:
    if name not in METHODS:
        raise PeftlabError(f"unknown method '{name}': expected one of {', '.join(METHODS)}")
    return METHODS[name]


def method_for(section: Any) -> AdapterMethod:
    """The method a run's adapter section (`config.AdapterConfig`, its dict form, ...) trains with: the one its
    `method` names, or the one that method hands over to for these settings (`AdapterMethod.runs_as`: LoRA with
    rank 0 is full fine-tuning)."""
    name = read_setting(section, "method")
    if name is None:
        raise PeftlabError(f"the adapter settings name no method (got {section!r}); expected e.g. "
                           "{'method': 'lora', 'rank': 8}")
    requested = get_method(name)
    return get_method(requested.runs_as(requested.settings(section)))
