"""The adapter-method protocol: what every PEFT method (LoRA, full fine-tuning, BitFit, head-only, ...) gives the
rest of peftlab, and the model-wide operations written once against it.

A method is an `AdapterMethod` registered in `peftlab.peft.methods`. It owns its settings (a dataclass, read by
field name from a run's adapter section), its one-line description for reports and, where Hugging Face peft has
the method, its peft export. It may put `AdapterModule`s into the model (LoRA layers; methods such as BitFit add
none) and decides which parameters train. Everything else — which tensors a checkpoint holds, the parameter report,
merging, switching adapters off — works on any method through `adapter_modules(model)`, never by name matching.

An `AdapterModule`:
* owns its adapter parameters (`adapter_parameters()`); a frozen layer it wraps is its `base` attribute, whose
  parameters keep their plain-model names in checkpoints (`<module>.weight`, not `<module>.base.weight`);
* describes itself as plain JSON data (`spec()`) from which its method rebuilds it (`AdapterMethod.rebuild`);
* has a `disabled` flag: a disabled module computes exactly its base (`disable_adapters`);
* if its method is mergeable (`mergeable = True`), offers idempotent `merge()` / `unmerge()` and a `merged` flag.

Adapter state is explicit: base weights change only when `merge()` / `unmerge()` (or `merge_adapters`, `merged`,
`merge_and_strip`) are called. `model.eval()` / `model.train()` and `disable_adapters` never rewrite a weight, so
evaluation, and a reference pass alternating with policy passes, leave W0 bitwise as it was (a fp32 merge/unmerge
round trip moves W0 by up to an ulp).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from peftlab.errors import PeftlabError

METHOD_ATTRIBUTE = "peftlab_method"  # set on a model by `apply_method` / `load_adapter`: the method's name
PEFT_KEY_PREFIX = "base_model.model."  # what Hugging Face peft puts before a module name in its tensor names


class AdapterModule(nn.Module):
    """Base class of the modules adapter methods insert (see the module docstring)."""

    method: ClassVar[str]  # the name of the method that creates this kind of module
    mergeable: ClassVar[bool] = False
    reads_base_weight: ClassVar[bool] = False  # the forward reads base.weight itself instead of calling base (DoRA)

    def __init__(self):
        super().__init__()
        self.disabled = False  # True inside `disable_adapters`: the module computes exactly its base

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The module's own parameters, not those of the base layer it wraps."""
        base = getattr(self, "base", None)
        base_ids = {id(parameter) for parameter in base.parameters()} if isinstance(base, nn.Module) else set()
        return [parameter for parameter in self.parameters() if id(parameter) not in base_ids]

    def spec(self) -> dict:
        """What rebuilds this module (besides its name and tensors), as JSON-compatible data."""
        raise NotImplementedError

    def remove_from(self, model: nn.Module, name: str) -> None:
        """Take this module (at `name` in `model`) out again: the base layer it wraps goes back in its place."""
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(getattr(self, "base", None), nn.Module):
            setattr(parent, child_name, self.base)
        else:
            delattr(parent, child_name)

    def merge(self) -> None:
        raise PeftlabError(f"{type(self).__name__} ({self.method}) cannot be merged into its base layer")

    def unmerge(self) -> None:
        raise PeftlabError(f"{type(self).__name__} ({self.method}) cannot be merged into its base layer")


def read_setting(section: Any, name: str, default: Any = None) -> Any:
    """One field of a run's adapter section, by name: an attribute of a settings object (`config.AdapterConfig`,
    a `SimpleNamespace`) or a key of its dict form (a run's config.yaml as reports read it). Methods read their own
    fields this way, so the section's format (and old run directories) stays as it is whatever methods exist."""
    if isinstance(section, Mapping):
        return section.get(name, default)
    return getattr(section, name, default)


@dataclass
class NoSettings:
    """The settings of a method that has none (full fine-tuning, BitFit, head-only)."""


class PeftExport(NamedTuple):
    """A method's part of a Hugging Face peft export (`peftlab.hf.export_peft` adds the trained extras)."""

    config: dict  # adapter_config.json entries of the method, "peft_type" included
    tensors: dict[str, torch.Tensor]  # adapter_model.safetensors entries, by peft's names
    exported: set[int]  # ids of the parameters those tensors carry


class AdapterMethod:
    """One PEFT method. Subclasses set `name` and override what differs; a new method is one file with a subclass
    (and its settings dataclass) and one line in `peftlab.peft.methods.METHODS`."""

    name: ClassVar[str]
    settings_type: ClassVar[type] = NoSettings  # its settings dataclass; field names = the adapter section's
    mergeable: ClassVar[bool] = False  # its modules fold into the base weights (merged == unmerged)
    module_type: ClassVar[type | None] = None  # the AdapterModule class it injects, if any
    adds_modules: ClassVar[bool] = False  # its modules are new children (a prefix), not wrappers of existing layers
    peft_type: ClassVar[str | None] = None  # Hugging Face peft's name of the method, when `peft_export` writes it

    def settings(self, section: Any) -> Any:
        """This method's settings from a run's adapter section (see `read_setting`): each field of `settings_type`
        by its name; a field the section lacks (a run written before the field existed) keeps its default."""
        values = {field.name: read_setting(section, field.name, MISSING) for field in fields(self.settings_type)}
        return self.settings_type(**{name: value for name, value in values.items() if value is not MISSING})

    def runs_as(self, settings: Any) -> str:
        """The method that trains with these settings: this one, unless a setting makes it another (LoRA with rank 0
        is full fine-tuning; `peftlab.peft.methods.method_for` follows this, the one place such a rule lives)."""
        return self.name

    def check_fits(self, settings: Any, model: str, max_length: int) -> None:
        """Refuse, before anything loads, settings the model `model` cannot take with examples of up to `max_length`
        tokens (a prefix that leaves too few positions); nothing to check for most methods."""

    def describe(self, settings: Any) -> str:
        """The method and its shape settings in a few characters, for report tables (e.g. "lora r8 α16 q,v")."""
        return self.name

    def inject(self, model: nn.Module, settings: Any) -> list[str]:
        """Put the method's modules into `model` (in place); returns a description of each. Default: none."""
        return []

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """What the method itself trains (the extras --extra-trainable adds are chosen elsewhere); by default the
        parameters of its `module_type` modules."""
        modules = [module for module in model.modules() if isinstance(module, self.module_type)]
        if not modules:
            raise PeftlabError(f"method '{self.name}' but the model has no {self.module_type.__name__} modules. "
                               f"Fix: apply_method(model, {{'method': '{self.name}', ...}}) first")
        return [parameter for module in modules for parameter in module.adapter_parameters()]

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model the method cannot train (e.g. BitFit without biases). Default: any model."""

    def rebuild(self, model: nn.Module, specs: Sequence[dict]) -> None:
        """Re-create saved modules from their `spec()` (entries: {"module": name, **spec}). Default: the method
        has no modules, so there must be no specs."""
        if specs:
            raise PeftlabError(f"method '{self.name}' has no adapter modules, but the checkpoint lists {len(specs)}")

    def peft_export(self, model: nn.Module, hf_name: Callable[[str], str]) -> PeftExport:
        """The method's adapter in Hugging Face peft's format; `hf_name` maps our module names to the Hugging Face
        model's. Only for methods with a `peft_type`."""
        raise PeftlabError(f"Hugging Face peft has no '{self.name}' method to export to")


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """(name, module) of every adapter module in the model, whatever its method."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            yield name, module


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [parameter for _, module in adapter_modules(model) for parameter in module.adapter_parameters()]


def merge_adapters(model: nn.Module) -> None:
    """Merge every mergeable adapter module (idempotent): inference then costs what the base model costs."""
    for _, module in adapter_modules(model):
        if module.mergeable:
            module.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Un-merge every mergeable adapter module (idempotent)."""
    for _, module in adapter_modules(model):
        if module.mergeable:
            module.unmerge()


@contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """Merged evaluation, asked for explicitly: within the block every mergeable adapter module is folded into its
    base weight, and on leaving it the modules this call merged are un-merged again.

    This is the switch for the seed's "model.eval() merges": evaluation is unmerged unless wrapped in
    `with merged(model):`. Merging costs one pass over each adapted weight on entry and one on exit; forwards inside
    then cost what the base model's cost (for DoRA also without its per-forward weight norm). A fp32 LoRA/IA3
    un-merge subtracts (divides) the update back, which moves W0 by up to an ulp per entry; half-precision weights
    and DoRA keep W0 and restore it exactly. Modules that cannot merge (bottleneck adapters, prefixes) run unmerged
    inside the block; it may not be used inside `disable_adapters`.
    """
    done = []
    try:
        for _, module in adapter_modules(model):
            if module.mergeable and not module.merged:
                module.merge()
                done.append(module)
        yield model
    finally:
        for module in done:
            module.unmerge()


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every adapter module computes exactly its base layer, e.g. for a DPO reference or "before
    fine-tuning" numbers.

    It only flips each module's `disabled` flag and never merges or un-merges, so reference and policy passes may
    alternate any number of times with the base weights left bitwise as they were. A merged module holds its update
    inside its base weight, so it is refused (un-merge first). Only adapter modules are switched off: parameters a
    method trains in place (a full fine-tune, BitFit biases, a trained head or norms) keep their trained values, so
    the model is the base model only where all training went into adapter modules (LoRA without --extra-trainable).
    Nested use is fine.
    """
    modules = [(name, module) for name, module in adapter_modules(model) if not module.disabled]
    still_merged = [name for name, module in modules if module.mergeable and module.merged]
    if still_merged:
        raise PeftlabError(f"disable_adapters: {still_merged[0]} (and {len(still_merged) - 1} more) is merged, so its "
                           "base weight holds the update. Fix: leave `merged(model)` or call unmerge_adapters(model) "
                           "first")
    for _, module in modules:
        module.disabled = True
    try:
        yield model
    finally:
        for _, module in modules:
            module.disabled = False


def merge_and_strip(model: nn.Module) -> nn.Module:
    """Merge every adapter module and replace it by the plain base layer it wraps (in place); returns the model.

    The result has the base model's module structure and parameter names, and no adapter parameters. A module
    of a method that cannot merge is an error (nothing is changed).
    """
    modules = list(adapter_modules(model))
    unmergeable = sorted({module.method for _, module in modules if not module.mergeable})
    if unmergeable:
        raise PeftlabError(f"method(s) {', '.join(unmergeable)} cannot be merged into the base weights; "
                           "keep the adapter and its base model instead")
    if any(module.disabled for _, module in modules):
        raise PeftlabError("cannot strip adapters inside disable_adapters(); leave the block first")
    for name, module in modules:
        module.merge()
        module.remove_from(model, name)
    return model
