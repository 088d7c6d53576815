"""Adapter checkpoints: the fine-tuned tensors only (adapter modules + trained head, biases, norms), never the base.

A checkpoint directory holds
  peftlab_adapter.safetensors   the tensors, by canonical (adapter-free model) names
  peftlab_adapter.json          base model name, the method, its adapter modules (module, kind = the method that
                                builds it, and its `spec()`, e.g. LoRA's slices, rank, alpha, dropout), which
                                tensors train, every tensor's shape, and free-form metadata
Format version 2 records the method; version 1 (LoRA-shaped, written before methods were plug-ins) still loads:
its adapter entries are LoRA layers. Names differ from Hugging Face peft's files (`adapter_model.safetensors`,
`adapter_config.json`, see peftlab.hf), so both formats can sit in the same directory. Files are written to a
temporary name and renamed into place; loading uses safetensors only (nothing is unpickled) and checks base
model, modules and every shape first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.fileio import atomic_write_file
from peftlab.peft.base import METHOD_ATTRIBUTE, adapter_modules, adapter_parameters
from peftlab.peft.methods import get_method
from peftlab.peft.prepare import adapter_state_dict, canonical_parameter_names

TENSORS_FILE = "peftlab_adapter.safetensors"
CONFIG_FILE = "peftlab_adapter.json"
FORMAT = "peftlab-adapter"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def module_specs(model: nn.Module) -> list[dict]:
    """The adapter modules of a model as plain data: {"module": name, "kind": method, **spec}."""
    return [{"module": name, "kind": module.method, **module.spec()} for name, module in adapter_modules(model)]


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, base_model: str, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save the adapter of `model` (its adapter modules and every trainable tensor) to `directory`.

    Args:
        model: a model prepared with `apply_method` (or the method's injection + `mark_trainable`), merged or not.
        directory: created if needed; existing peftlab adapter files are replaced atomically.
        base_model: the base model's name (e.g. "gpt2", "smollm2-135m"); `load_adapter` refuses other bases.
        metadata: JSON-serialisable extras to record (method, targets, training settings ...).
    """
    directory = Path(directory)
    tensors = {name: tensor.to("cpu").contiguous().clone() for name, tensor in adapter_state_dict(model).items()}
    trainable = [name for name, parameter in canonical_parameter_names(model).items() if parameter.requires_grad]
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "method": getattr(model, METHOD_ATTRIBUTE, None),
        "adapters": module_specs(model),
        "trainable": trainable,
        "shapes": {name: list(tensor.shape) for name, tensor in tensors.items()},
        "dtypes": {name: str(tensor.dtype).removeprefix("torch.") for name, tensor in tensors.items()},
        "metadata": dict(metadata or {}),
    }
    atomic_write_file(directory / TENSORS_FILE, lambda path: save_file(tensors, path, metadata={"format": FORMAT}))
    atomic_write_file(directory / CONFIG_FILE, lambda path: Path(path).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The JSON config of a saved adapter, with a clear error when it is missing or not ours."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise PeftlabError(f"no peftlab adapter in {directory}: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise PeftlabError(f"{path} is not valid JSON: {error}") from None
    if config.get("format") != FORMAT or config.get("format_version") not in READABLE_VERSIONS:
        raise PeftlabError(
            f"{path}: expected format '{FORMAT}' version {' or '.join(map(str, READABLE_VERSIONS))}, "
            f"found '{config.get('format')}' version {config.get('format_version')}"
        )
    if config["format_version"] == 1:  # LoRA layers only, without a kind
        config["adapters"] = [{"module": item["module"], "kind": "lora", **{key: value for key, value in item.items()
                                                                             if key != "module"}}
                              for item in config["adapters"]]
        config["method"] = "lora" if config["adapters"] else None
    return config


def load_adapter(model: nn.Module, directory: str | os.PathLike, base_model: str) -> dict:
    """Load a saved adapter into `model` (in place) and return its config.

    A model without adapter modules gets the saved ones (rebuilt by their method); a model with adapter modules
    must have exactly the saved ones. The base model name and every tensor's name and shape are checked before
    anything changes; afterwards the saved trainable tensors (and only those) require grad, so training can go on.

    Args:
        model: the base model, loaded the same way as for training (same task and head size).
        directory: a directory written by `save_adapter`.
        base_model: the name of `model`'s base; must equal the one recorded at save time.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    if config["base_model"] != base_model:
        raise PeftlabError(
            f"the adapter in {directory} was trained on base model '{config['base_model']}', not '{base_model}'. "
            f"Fix: load it onto '{config['base_model']}'"
        )
    saved = config["adapters"]
    present = module_specs(model)
    if present:
        if [_describe(item) for item in present] != [_describe(item) for item in saved]:
            raise PeftlabError(
                f"the model's adapter modules differ from the adapter's in {directory} "
                f"(model: {_describe(present[0])}, ... {len(present)} modules; adapter: "
                f"{_describe(saved[0]) if saved else 'none'}, ... {len(saved)} modules). "
                "Fix: load it onto a model without adapters"
            )
    else:
        _check_adaptable(model, saved, directory)
    try:
        tensors = load_file(directory / TENSORS_FILE)
    except (OSError, SafetensorError) as error:
        raise PeftlabError(f"cannot read {directory / TENSORS_FILE}: {error}") from None

    if not present:
        for kind in dict.fromkeys(item["kind"] for item in saved):  # each method rebuilds its own modules
            get_method(kind).rebuild(model, [item for item in saved if item["kind"] == kind])
    try:
        _check_tensors(model, tensors, directory)
    except PeftlabError:
        if not present:
            _remove_adapter_modules(model)  # leave the model as it came
        raise

    parameters = canonical_parameter_names(model)
    mergeable = [module for _, module in adapter_modules(model) if module.mergeable]
    merged = [module.merged for module in mergeable]
    for module in mergeable:
        module.unmerge()
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    for module, was_merged in zip(mergeable, merged):
        if was_merged:
            module.merge()
    trainable = set(config["trainable"])
    for name, parameter in parameters.items():
        parameter.requires_grad_(name in trainable)
    if config["method"]:
        setattr(model, METHOD_ATTRIBUTE, config["method"])
    return config


def _describe(item: Mapping[str, Any]) -> str:
    """A module's identity for comparisons: its name, kind and shape settings (dropout only acts in training)."""
    details = ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                        for key, value in item.items() if key not in ("module", "kind", "dropout"))
    return f"{item['module']} {item['kind']}({details})"


def _check_adaptable(model: nn.Module, saved: list[dict], directory: Path) -> None:
    modules = dict(model.named_modules())

    def present(item: dict) -> bool:  # a wrapping module replaces a layer that exists; an added one needs its parent
        name = item["module"] if not get_method(item["kind"]).adds_modules else item["module"].rpartition(".")[0]
        return name in modules

    missing = [item["module"] for item in saved if not present(item)]
    if missing:
        raise PeftlabError(
            f"the adapter in {directory} targets layers this model does not have: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Is it the same base model and task (causal-lm / classification)?"
        )


def _remove_adapter_modules(model: nn.Module) -> None:
    """Put every (freshly rebuilt, untrained) adapter module's base layer back in its place."""
    for name, module in list(adapter_modules(model)):
        module.remove_from(model, name)


def _check_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], directory: Path) -> None:
    parameters = canonical_parameter_names(model)
    unknown = sorted(set(tensors) - set(parameters))
    if unknown:
        raise PeftlabError(
            f"the adapter in {directory} has tensors this model lacks: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}. "
            "Is it the same base model and task (causal-lm / classification)?"
        )
    adapter_ids = {id(p) for p in adapter_parameters(model)}
    missing = sorted(name for name, parameter in parameters.items() if id(parameter) in adapter_ids and name not in tensors)
    if missing:
        raise PeftlabError(f"the adapter in {directory} lacks adapter tensors: {missing[:5]}")
    mismatched = [
        f"{name}: saved {tuple(tensor.shape)}, model {tuple(parameters[name].shape)}"
        for name, tensor in tensors.items()
        if tuple(tensor.shape) != tuple(parameters[name].shape)
    ]
    if mismatched:
        raise PeftlabError(
            f"the adapter in {directory} does not fit this model ({len(mismatched)} shape mismatches: "
            f"{'; '.join(mismatched[:3])}{' ...' if len(mismatched) > 3 else ''}). "
            "Fix: load it onto the base model (size, number of labels) it was trained on"
        )


def _body_name(name: str, body_prefix: str) -> str:
    """A tensor's name inside the transformer body, however the run held the body (a classifier's `backbone.`, a
    language model's `transformer.` or `model.`), so an adapter moves between objectives; a head's name stays."""
    for prefix in ("backbone.", f"{body_prefix}."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def checkpoint_parameters(model: nn.Module, directory: str | os.PathLike
                          ) -> tuple[dict[str, tuple[nn.Parameter, torch.Tensor]], list[str]]:
    """Another run's checkpoint tensors matched to this model's parameters, by name inside the transformer body (so
    an adapter moves between objectives): ({name: (parameter, tensor)} of those with the same shape, the names of
    the tensors this model lacks or shapes differently). Every adapter parameter of `model` must have its tensor."""
    directory = Path(directory)
    try:
        saved = load_file(directory / TENSORS_FILE)
    except (OSError, SafetensorError) as error:
        raise PeftlabError(f"cannot read {directory / TENSORS_FILE}: {error}") from None
    body_prefix = getattr(getattr(model, "backbone", model), "base_model_prefix", "")
    tensors = {_body_name(name, body_prefix): tensor for name, tensor in saved.items()}
    parameters = {_body_name(name, body_prefix): parameter
                  for name, parameter in canonical_parameter_names(model).items()}
    adapter_ids = {id(parameter) for parameter in adapter_parameters(model)}
    missing = [name for name, parameter in parameters.items() if id(parameter) in adapter_ids and name not in tensors]
    if missing:
        raise PeftlabError(f"{directory} lacks adapter tensors this run has: {', '.join(missing[:3])}")
    fits = {name: (parameters[name], tensor) for name, tensor in tensors.items()
            if name in parameters and tuple(tensor.shape) == tuple(parameters[name].shape)}
    return fits, sorted(set(tensors) - set(fits))
