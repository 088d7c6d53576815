"""The adapter-method protocol: what every PEFT method (LoRA, full fine-tuning, BitFit, head-only, ...) gives the
rest of peftlab, and the model-wide operations written once against it.

A method is an `AdapterMethod` registered in `peftlab.peft.methods`. It may put `AdapterModule`s into the model
(LoRA layers; methods such as BitFit add none) and decides which parameters train. Everything else — which
tensors a checkpoint holds, the parameter report, merging, switching adapters off — works on any method through
`adapter_modules(model)`, never by name matching.

An `AdapterModule`:
* owns its adapter parameters (`adapter_parameters()`); a frozen layer it wraps is its `base` attribute, whose
  parameters keep their plain-model names in checkpoints (`<module>.weight`, not `<module>.base.weight`);
* describes itself as plain JSON data (`spec()`) from which its method rebuilds it (`AdapterMethod.rebuild`);
* has a `disabled` flag: a disabled module computes exactly its base (`disable_adapters`);
* if its method is mergeable (`mergeable = True`), offers idempotent `merge()` / `unmerge()`, a `merged` flag, and
  `merge_on_eval` (whether `model.eval()` merges it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from peftlab.errors import PeftlabError

METHOD_ATTRIBUTE = "peftlab_method"  # set on a model by `apply_method` / `load_adapter`: the method's name


class AdapterModule(nn.Module):
    """Base class of the modules adapter methods insert (see the module docstring)."""

    method: ClassVar[str]  # the name of the method that creates this kind of module
    mergeable: ClassVar[bool] = False

    def __init__(self):
        super().__init__()
        self.disabled = False  # True inside `disable_adapters`: the module computes exactly its base
        self.merge_on_eval = False  # mergeable modules: `train(False)` merges, `train(True)` un-merges

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


@dataclass(frozen=True)
class MethodSettings:
    """The settings every method is built from; each method reads the ones it needs."""

    targets: tuple[str, ...] = ("all-linear",)  # roles, module names or regexes (see peft.targets)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    extra_trainable: tuple[str, ...] | None = None  # head, biases, norms; None = the head of a classifier
    adapter_size: int = 64  # bottleneck adapters: m
    adapter_placement: str = "houlsby"  # bottleneck adapters: houlsby | pfeiffer
    adapter_nonlinearity: str = "relu"  # bottleneck adapters
    prefix_length: int = 10  # prefix tuning: p
    prefix_projection: int | None = None  # prefix tuning: the MLP width H, None = plain prefixes


class AdapterMethod:
    """One PEFT method. Subclasses set `name` and override what differs; a new method is one file with a subclass
    and one line in `peftlab.peft.methods.METHODS`."""

    name: ClassVar[str]
    mergeable: ClassVar[bool] = False  # its modules fold into the base weights (merged == unmerged)
    module_type: ClassVar[type | None] = None  # the AdapterModule class it injects, if any
    adds_modules: ClassVar[bool] = False  # its modules are new children (a prefix), not wrappers of existing layers

    def inject(self, model: nn.Module, settings: MethodSettings) -> list[str]:
        """Put the method's modules into `model` (in place); returns a description of each. Default: none."""
        return []

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """What the method itself trains (the extras --extra-trainable adds are chosen elsewhere); by default the
        parameters of its `module_type` modules."""
        modules = [module for module in model.modules() if isinstance(module, self.module_type)]
        if not modules:
            raise PeftlabError(f"method '{self.name}' but the model has no {self.module_type.__name__} modules. "
                               f"Fix: apply_method(model, '{self.name}', ...) first")
        return [parameter for module in modules for parameter in module.adapter_parameters()]

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model the method cannot train (e.g. BitFit without biases). Default: any model."""

    def rebuild(self, model: nn.Module, specs: Sequence[dict]) -> None:
        """Re-create saved modules from their `spec()` (entries: {"module": name, **spec}). Default: the method
        has no modules, so there must be no specs."""
        if specs:
            raise PeftlabError(f"method '{self.name}' has no adapter modules, but the checkpoint lists {len(specs)}")


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
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every adapter module computes exactly its base layer (merged ones are un-merged first),
    e.g. for a DPO reference or "before fine-tuning" numbers.

    Only adapter modules are switched off: parameters a method trains in place (a full fine-tune, BitFit biases,
    a trained head or norms) keep their trained values, so the model is the base model only where all training
    went into adapter modules (LoRA without --extra-trainable).

    On exit a mergeable module is merged again if it follows `model.eval()` (merge_on_eval and not training) or,
    with merge_on_eval off, if it was merged on entry. Nested use is fine.
    """
    entered = []
    for _, module in adapter_modules(model):
        if module.disabled:
            continue
        was_merged = module.mergeable and module.merged
        if module.mergeable:
            module.unmerge()
        module.disabled = True
        entered.append((module, was_merged))
    try:
        yield model
    finally:
        for module, was_merged in entered:
            module.disabled = False
            if module.mergeable and ((not module.training) if module.merge_on_eval else was_merged):
                module.merge()


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
