"""The registry of adapter methods: a new method is one file implementing `AdapterMethod` and one line here."""

from __future__ import annotations

from peftlab.errors import PeftlabError
from peftlab.peft.base import AdapterMethod
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
