"""Preparing a model for fine-tuning with any method, and what the preparation amounts to.

* `apply_method(model, adapter)` injects the method's modules and decides what trains (the CLI's entry point);
* `mark_trainable(model, method, extra)` is the one place that sets `requires_grad`: the method's own parameters
  (`AdapterMethod.trainable_parameters`) plus the extras, chosen by visiting modules (norm layers, the classifier
  head module, `bias` parameters), never by matching parameter names;
* `parameter_report(model)` gives the counts people compare; `adapter_state_dict(model)` the tensors a checkpoint
  holds, by the names they have in the plain model (`canonical_parameter_names`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.peft.base import METHOD_ATTRIBUTE, adapter_modules, adapter_parameters, read_setting
from peftlab.peft.methods import METHODS, get_method, method_for
from peftlab.peft.simple import bias_parameters, classifier_head

EXTRA_TRAINABLE = ("head", "biases", "norms")


# ----------------------------------------------------------------------------------------------------------
# Trainability: the one place that sets requires_grad


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm layers, including model-specific classes such as LlamaRMSNorm."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def check_extra_trainable(extra: Sequence[str]) -> None:
    """Every item of --extra-trainable is one peftlab knows (checked before any model loads, and again here)."""
    unknown = [item for item in extra if item not in EXTRA_TRAINABLE]
    if unknown:
        raise PeftlabError(f"--extra-trainable: unknown extra trainable(s) {', '.join(unknown)}: expected any of "
                           f"{', '.join(EXTRA_TRAINABLE)}")


def mark_trainable(
    model: nn.Module, method: str = "lora", extra: Sequence[str] | None = None
) -> list[str]:
    """Set `requires_grad` on every parameter for a fine-tuning method; returns the trainable parameter names.

    Args:
        model: the model (with the method's modules already injected, e.g. LoRA layers for "lora").
        method: a name in `peftlab.peft.methods.METHODS`: "lora" (the LoRA A/B matrices), "full" (everything),
            "bitfit" (every bias), "head" (the classifier head only), ...
        extra: what else trains: any of "head", "biases", "norms". None means "head" when the model has a
            classifier head (a random head must learn), else nothing.

    Everything not selected is frozen. The method's name is recorded on the model (`METHOD_ATTRIBUTE`) for checkpoints.
    """
    chosen_method = get_method(method)
    chosen_method.check_model(model)
    head = classifier_head(model)
    if extra is None:
        extra = ("head",) if head is not None else ()
    check_extra_trainable(extra)
    if head is None and "head" in extra:
        raise PeftlabError("no classifier head to train: this is not a classification model (expected a `score` module)")

    selected = list(chosen_method.trainable_parameters(model))
    if "biases" in extra:
        selected += bias_parameters(model)
    if "head" in extra:
        selected += list(head.parameters())
    if "norms" in extra:
        selected += [parameter for module in model.modules() if is_norm(module) for parameter in module.parameters()]

    chosen = {id(parameter) for parameter in selected}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    setattr(model, METHOD_ATTRIBUTE, method)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def apply_method(model: nn.Module, adapter: Any) -> list[str]:
    """Prepare a model for fine-tuning with the method of a run's adapter section; returns the adapted modules.

    Args:
        model: the loaded model (e.g. from `peftlab.models.load_model`).
        adapter: the run's adapter section (`peftlab.config.AdapterConfig`), its dict form, or any object with
            such attributes: `method` (a name in `peftlab.peft.methods.METHODS`), `extra_trainable` ("head",
            "biases", "norms" to train as well; None or absent = the head of a classifier) and the fields of that
            method's settings (`settings_type`, e.g. `LoRASettings`: targets, rank, alpha, dropout), read by name.
            Other methods' fields are ignored; a dict key no method knows is an error (a typo, not a setting).

    Print `parameter_report(model)` afterwards for the counts.
    """
    if isinstance(adapter, Mapping):
        check_setting_names(adapter)
    method = method_for(adapter)
    adapted = method.inject(model, method.settings(adapter))
    mark_trainable(model, method.name, read_setting(adapter, "extra_trainable"))
    return adapted


def unused_settings(adapter: Any) -> list[str]:
    """The fields of an adapter section (a dataclass such as `config.AdapterConfig`) that were given, i.e. differ
    from the section's defaults, but that its method does not read (`rank` with ia3, `prefix_length` with lora):
    all fields less the method's `settings_type` fields, `method` and `extra_trainable`."""
    read = {"method", "extra_trainable"} | {field.name for field in fields(get_method(adapter.method).settings_type)}
    defaults = type(adapter)()
    return [field.name for field in fields(adapter) if field.name not in read
            and getattr(adapter, field.name) != getattr(defaults, field.name)]


def check_setting_names(adapter: Mapping) -> None:
    """Every key of a dict of adapter settings is a field some registered method reads."""
    known = {"method", "extra_trainable"} | {field.name for method in METHODS.values()
                                            for field in fields(method.settings_type)}
    unknown = sorted(set(adapter) - known)
    if unknown:
        raise PeftlabError(f"apply_method: unknown adapter setting(s) {', '.join(unknown)}; known: "
                           f"{', '.join(sorted(known))}")


# ----------------------------------------------------------------------------------------------------------
# Counting


@dataclass(frozen=True)
class ParameterReport:
    """Parameter counts as people compare them. total counts distinct parameters, adapters included."""

    total: int
    trainable: int
    adapter: int

    @property
    def reduction(self) -> float:
        """1 - trainable / total, as a fraction."""
        return 1.0 - self.trainable / self.total if self.total else 0.0

    def lines(self) -> list[str]:
        return [
            f"Number of parameters: {self.total / 1e6:.2f}M",
            f"Trainable parameters: {self.trainable / 1e6:.2f}M ({self.trainable:,})",
            f"Adapter parameters: {self.adapter:,}",
            f"Reduction: {self.reduction * 100:.2f}%",
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def parameter_report(model: nn.Module) -> ParameterReport:
    """Total, trainable and adapter-module parameter counts of a model (tied weights counted once)."""
    parameters = list(model.parameters())  # distinct tensors
    adapter_ids = {id(p) for p in adapter_parameters(model)}
    return ParameterReport(
        total=sum(p.numel() for p in parameters),
        trainable=sum(p.numel() for p in parameters if p.requires_grad),
        adapter=sum(p.numel() for p in parameters if id(p) in adapter_ids),
    )


# ----------------------------------------------------------------------------------------------------------
# Adapter state: what a checkpoint holds


def canonical_parameter_names(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by the name they have in the plain (adapter-free) model; adapter tensors keep their own names.

    An adapter module's wrapped base parameters live at `<module>.base.weight`; their canonical name is
    `<module>.weight`, so checkpoints of trained biases load whether or not adapters exist yet.
    """
    renamed: dict[int, str] = {}
    for name, module in adapter_modules(model):
        base = getattr(module, "base", None)
        if not isinstance(base, nn.Module):
            continue
        prefix = f"{name}." if name else ""
        for parameter_name, parameter in base.named_parameters():
            renamed[id(parameter)] = prefix + parameter_name
    return {renamed.get(id(parameter), name): parameter for name, parameter in model.named_parameters()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a fine-tuned model adds to its base: the adapter modules' tensors plus every other trainable
    tensor (head, biases, norms), by canonical name, detached."""
    adapter_ids = {id(p) for p in adapter_parameters(model)}
    return {
        name: parameter.detach()
        for name, parameter in canonical_parameter_names(model).items()
        if parameter.requires_grad or id(parameter) in adapter_ids
    }
