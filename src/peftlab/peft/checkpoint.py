"""Adapter checkpoints: the fine-tuned tensors only (LoRA A/B + trained head, biases, norms), never the base.

A checkpoint directory holds
  peftlab_adapter.safetensors   the tensors, by canonical (adapter-free model) names
  peftlab_adapter.json          base model name, the LoRA layers (module, slices, rank, alpha, dropout),
                                which tensors train, every tensor's shape, and free-form metadata
Names differ from Hugging Face peft's files (`adapter_model.safetensors`, `adapter_config.json`, see export.py),
so both formats can sit in the same directory. Files are written to a temporary name and renamed into place;
loading uses safetensors only (nothing is unpickled) and checks base model, layers and every shape first.
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
from peftlab.peft.inject import AdapterSpec, adapter_specs, adapter_state_dict, apply_adapter_specs, canonical_parameter_names
from peftlab.peft.lora import lora_layers, merge_and_strip

TENSORS_FILE = "peftlab_adapter.safetensors"
CONFIG_FILE = "peftlab_adapter.json"
FORMAT = "peftlab-adapter"
FORMAT_VERSION = 1


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, base_model: str, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save the adapter of `model` (LoRA A/B and every trainable tensor) to `directory`; returns the directory.

    Args:
        model: a model prepared with `apply_method` / `apply_adapters` + `mark_trainable`, merged or not.
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
        "adapters": adapter_specs(model),
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
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise PeftlabError(
            f"{path}: expected format '{FORMAT}' version {FORMAT_VERSION}, "
            f"found '{config.get('format')}' version {config.get('format_version')}"
        )
    return config


def load_adapter(model: nn.Module, directory: str | os.PathLike, base_model: str) -> dict:
    """Load a saved adapter into `model` (in place) and return its config.

    A model without LoRA layers gets the saved ones; a model with LoRA layers must have exactly the saved ones.
    The base model name and every tensor's name and shape are checked before anything changes; afterwards the
    saved trainable tensors (and only those) require grad, so training can go on.

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
    saved_specs = [
        (AdapterSpec(item["module"], tuple(item["slices"]) if item["slices"] else None), item)
        for item in config["adapters"]
    ]
    present = adapter_specs(model)
    if present:
        if [_describe(item) for item in present] != [_describe(item) for _, item in saved_specs]:
            raise PeftlabError(
                f"the model's LoRA layers differ from the adapter's in {directory} "
                f"(model: {_describe(present[0])}, ... {len(present)} layers; adapter: "
                f"{_describe(saved_specs[0][1]) if saved_specs else 'none'}, ... {len(saved_specs)} layers). "
                "Fix: load it onto a model without adapters"
            )
        added = False
    else:
        _check_adaptable(model, saved_specs, directory)
        added = True
    try:
        tensors = load_file(directory / TENSORS_FILE)
    except (OSError, SafetensorError) as error:
        raise PeftlabError(f"cannot read {directory / TENSORS_FILE}: {error}") from None

    if added:
        for spec, item in saved_specs:
            apply_adapter_specs(model, [spec], item["rank"], item["alpha"], item["dropout"])
    try:
        _check_tensors(model, tensors, directory)
    except PeftlabError:
        if added:
            merge_and_strip(model)  # leave the model as it came: B is still zero, so merging adds exactly nothing
        raise

    parameters = canonical_parameter_names(model)
    layers = [layer for _, layer in lora_layers(model)]
    merged = [layer.merged for layer in layers]
    for layer in layers:
        layer.unmerge()
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    for layer, was_merged in zip(layers, merged):
        if was_merged:
            layer.merge()
    trainable = set(config["trainable"])
    for name, parameter in parameters.items():
        parameter.requires_grad_(name in trainable)
    return config


def _describe(item: Mapping[str, Any]) -> str:
    spec = AdapterSpec(item["module"], tuple(item["slices"]) if item["slices"] else None)
    return f"{spec} rank={item['rank']} alpha={float(item['alpha']):g}"


def _check_adaptable(model: nn.Module, saved_specs, directory: Path) -> None:
    modules = dict(model.named_modules())
    missing = [str(spec) for spec, _ in saved_specs if not isinstance(modules.get(spec.module), nn.Linear)]
    if missing:
        raise PeftlabError(
            f"the adapter in {directory} targets layers this model does not have: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Is it the same base model and task (causal-lm / classification)?"
        )


def _check_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], directory: Path) -> None:
    parameters = canonical_parameter_names(model)
    unknown = sorted(set(tensors) - set(parameters))
    if unknown:
        raise PeftlabError(
            f"the adapter in {directory} has tensors this model lacks: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}. "
            "Is it the same base model and task (causal-lm / classification)?"
        )
    lora_ids = {id(p) for _, layer in lora_layers(model) for p in layer.lora_parameters()}
    missing = sorted(name for name, parameter in parameters.items() if id(parameter) in lora_ids and name not in tensors)
    if missing:
        raise PeftlabError(f"the adapter in {directory} lacks LoRA tensors: {missing[:5]}")
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

