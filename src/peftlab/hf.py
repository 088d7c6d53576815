"""Hugging Face interop in one place: a `peft` adapter export, a merged plain `transformers` model, Linear -> Conv1D.

`export_peft` writes `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained`
loads onto the *unconverted* Hugging Face base model (GPT-2 with its `Conv1D` layers) and reproduces our logits,
for LoRA, DoRA (LoRA + `lora_magnitude_vector`), IA3 (`ia3_l`) and prefix tuning (`prompt_embeddings`). Each
method writes its own part (`AdapterMethod.peft_export`, for methods with a `peft_type`); this module adds the
trained extras, the task type and the files:

* A and B keep their shapes: peft's LoRA on a `Conv1D` (`fan_in_fan_out=True`) stores lora_A (r, in) and
  lora_B (out, r) like ours; only its merge transposes.
* GPT-2 q/v slices of `c_attn` are exported as one LoRA of rank n·r over the whole `c_attn` (A stacks the slices'
  A, B is block-structured with zero rows for k) with alpha n·alpha, so alpha/r is unchanged; layers whose
  rank/alpha differ from the most common pair get `rank_pattern` / `alpha_pattern` entries.
* A `SequenceClassifier` is exported for the matching `AutoModelForSequenceClassification` (GPT-2 and Llama both
  call their head `score`): `backbone.` becomes the body's `base_model_prefix`, the head goes to `modules_to_save`.
  Trained norms go to `modules_to_save`; trained biases are saved under peft's names with `bias="all"`.

`export_merged` folds the adapters in and saves a plain model `from_pretrained` can load (for GPT-2 the linear
layers are turned back into `Conv1D`, weight (in, out), by `convert_linear_to_conv1d`).

Either export is one directory, built beside its place and swapped in whole, with `peftlab_export.json` saying
what it is (format, and for a run's export the run and checkpoint). Only such a directory, or an empty one, is
ever replaced: a user's folder or file at the path is refused unless `overwrite` is given.

peft itself is not imported: the format is written by hand and checked against peft in the tests.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.fileio import read_json, replace_directory, write_text_atomic
from peftlab.models import SequenceClassifier, convert_conv1d_to_linear
from peftlab.peft.base import PEFT_KEY_PREFIX, adapter_modules, merge_and_strip
from peftlab.peft.methods import METHODS, get_method
from peftlab.peft.prepare import canonical_parameter_names, is_norm
from peftlab.peft.simple import classifier_head
from peftlab.peft.targets import architecture

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
EXPORT_RECORD = "peftlab_export.json"
EXPORT_README = "README.md"


def _hf_name_mapper(model: nn.Module):
    """Module-name translation from our model to the Hugging Face model peft / transformers will load."""
    if isinstance(model, SequenceClassifier):
        body_prefix = model.backbone.base_model_prefix  # "transformer" (GPT-2), "model" (Llama)

        def mapped(name: str) -> str:
            if name == "backbone" or name.startswith("backbone."):
                return body_prefix + name.removeprefix("backbone")
            return name

        return mapped
    return lambda name: name


def _task_type(model: nn.Module) -> str | None:
    if isinstance(model, SequenceClassifier):
        return "SEQ_CLS"
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return "CAUSAL_LM"
    return None


def _write_export(directory: str | os.PathLike, fill, export_format: str, record: dict | None, overwrite: bool) -> Path:
    def fill_and_record(staging: Path) -> None:
        fill(staging)
        write_text_atomic(staging / EXPORT_RECORD, json.dumps({"format": export_format} | (record or {}), indent=2) + "\n")
        if record and "base_model" in record:
            write_text_atomic(staging / EXPORT_README, export_readme(export_format, record))

    return replace_directory(Path(directory), fill_and_record, EXPORT_RECORD, overwrite)


def export_readme(export_format: str, record: dict) -> str:
    """The export's README.md: what it is, its base model (and how that base was made), how to load it."""
    base = record["base_model"]
    if export_format == "peft":
        load = ("The adapter goes onto its base model (the class of the run's task: AutoModelForCausalLM or "
                "AutoModelForSequenceClassification with the run's number of labels):\n\n"
                "    from peft import PeftModel\n    from transformers import AutoModelForCausalLM\n\n"
                f"    base = AutoModelForCausalLM.from_pretrained(\"{base}\")  # or a copy of it, by path\n"
                "    model = PeftModel.from_pretrained(base, \"<this folder>\")\n\n"
                "`adapter_config.json` names the base (`base_model_name_or_path`) for tools that load it themselves.")
    else:
        load = "A plain model with the adapter merged in: `from_pretrained(\"<this folder>\")`."
    return (f"# peftlab export ({export_format})\n\nRun: {record.get('run')} [{record.get('checkpoint')}]\n\n"
            f"Base model: {base}: {record.get('base_model_note', '')}.\n\n{load}\n")


def read_export_record(directory: str | os.PathLike) -> dict | None:
    """What an earlier export in `directory` recorded, or None when it is not one."""
    path = Path(directory) / EXPORT_RECORD
    try:
        record = read_json(path, "export record") if path.is_file() else None
    except PeftlabError:
        return None  # unreadable: not a record this run can rely on
    return record if isinstance(record, dict) else None


def export_peft(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str,
                record: dict | None = None, overwrite: bool = False) -> Path:
    """Write the model's adapter in Hugging Face peft's format (loadable with `PeftModel.from_pretrained`).

    Args:
        model: a model with LoRA, DoRA, IA3 or prefix-tuning modules (merged or not).
        directory: the export directory: `adapter_config.json`, `adapter_model.safetensors` and the export record;
            it must not exist, be empty, or be an earlier export (unless `overwrite`).
        base_model_name_or_path: what peft records as the base (a hub id or a local directory).
        record: extra facts for the export record (e.g. the run and checkpoint exported).
        overwrite: replace whatever is at `directory`.
    """
    methods = sorted({module.method for _, module in adapter_modules(model)})
    if not methods:
        raise PeftlabError("the model has no adapter modules to export in peft format. Fix: export with "
                           "--format merged (Python: export_merged) instead")
    if len(methods) > 1 or get_method(methods[0]).peft_type is None:
        exportable = [name for name, method in METHODS.items() if method.peft_type]
        raise PeftlabError(f"the peft export carries one of {', '.join(exportable)}; this model has "
                           f"{', '.join(methods)} modules (peft has no such method). Fix: --format merged "
                           "(Python: export_merged) when the method merges, else keep the run directory")
    hf_name = _hf_name_mapper(model)
    config, tensors, exported = get_method(methods[0]).peft_export(model, hf_name)
    saved_whole, trained_biases = _export_trained_extras(model, hf_name, exported, tensors)
    if trained_biases and config["peft_type"] != "LORA":
        raise PeftlabError(f"trained biases cannot be carried by peft's {config['peft_type']} format. "
                           "Fix: export with --format merged (Python: export_merged)")
    if trained_biases:
        config["bias"] = "all"
    config = {"peft_type": config.pop("peft_type"), "task_type": _task_type(model),
              "base_model_name_or_path": base_model_name_or_path, **config,
              "modules_to_save": saved_whole or None, "inference_mode": True}
    cpu_tensors = {key: tensor.to("cpu").contiguous().clone() for key, tensor in tensors.items()}

    def fill(staging: Path) -> None:
        save_file(cpu_tensors, staging / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    return _write_export(directory, fill, "peft", record, overwrite)


def _export_trained_extras(model: nn.Module, hf_name, exported: set[int], tensors: dict) -> tuple[list[str], bool]:
    """Trained tensors besides the adapter's: the head and norms as modules_to_save, biases under peft's names.
    Returns the whole modules saved and whether biases were."""
    parameters = canonical_parameter_names(model)
    trained = {id(p) for p in parameters.values() if p.requires_grad and id(p) not in exported}
    saved_whole: list[str] = []
    head = classifier_head(model)
    for name, module in model.named_modules():
        if not (is_norm(module) or module is head):
            continue
        module_parameters = list(module.parameters())
        if module_parameters and any(id(p) in trained for p in module_parameters):
            saved_whole.append(hf_name(name))
            for parameter_name, parameter in module.named_parameters():
                tensors[f"{PEFT_KEY_PREFIX}{hf_name(name)}.{parameter_name}"] = parameter.detach()
                trained.discard(id(parameter))
    wrapped_biases = {id(module.base.bias): name for name, module in adapter_modules(model)
                      if isinstance(getattr(module, "base", None), nn.Linear) and module.base.bias is not None}
    trained_biases = False
    for name, parameter in parameters.items():
        if id(parameter) not in trained:
            continue
        parameter_name = name.rpartition(".")[2]
        if parameter_name != "bias":
            raise PeftlabError(
                f"'{name}' is trained but peft's format can only carry the adapter, whole modules (head, norms) "
                "and biases. Fix: export with --format merged (Python: export_merged)"
            )
        trained_biases = True
        wrapped = wrapped_biases.get(id(parameter))
        peft_name = f"{hf_name(wrapped)}.base_layer.bias" if wrapped else hf_name(name)
        tensors[PEFT_KEY_PREFIX + peft_name] = parameter.detach()
    return saved_whole, trained_biases


def convert_linear_to_conv1d(model: nn.Module) -> list[str]:
    """The inverse of `peftlab.models.convert_conv1d_to_linear` for GPT-2: every `nn.Linear` inside a `GPT2Block`
    becomes a transformers `Conv1D` again (weight (out, in) -> (in, out)). Returns the converted module names."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.pytorch_utils import Conv1D

    converted = []
    for block_name, block in list(model.named_modules()):
        if not isinstance(block, GPT2Block):
            continue
        for name, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            conv = Conv1D(module.out_features, module.in_features).to(module.weight.device, module.weight.dtype)
            with torch.no_grad():
                conv.weight.copy_(module.weight.T)  # (out, in) -> (nx=in, nf=out)
                if module.bias is not None:
                    conv.bias.copy_(module.bias)
                else:
                    conv.bias.zero_()
            parent_name, _, child_name = name.rpartition(".")
            setattr(block.get_submodule(parent_name), child_name, conv)
            converted.append(f"{block_name}.{name}")
    return converted


def merged_hf_model(model: nn.Module) -> nn.Module:
    """A plain `transformers` model equal to `model` with its adapters merged (a copy; `model` is untouched).

    Language models stay their own class; a `SequenceClassifier` becomes the matching
    `AutoModelForSequenceClassification` (GPT-2 / Llama: same `score` head on the last non-padding token).
    """
    from transformers import AutoModelForSequenceClassification, PreTrainedModel

    plain = merge_and_strip(copy.deepcopy(model))
    if isinstance(plain, SequenceClassifier):
        config = copy.deepcopy(plain.backbone.config)
        config.num_labels = plain.num_labels
        hf_model = AutoModelForSequenceClassification.from_config(config, dtype=plain.score.weight.dtype)
        convert_conv1d_to_linear(hf_model)  # same layout as our backbone; converted back below
        if not isinstance(classifier_head(hf_model), nn.Linear) or classifier_head(hf_model).bias is not None:
            raise PeftlabError(f"{type(hf_model).__name__} has no bias-free linear `score` head like SequenceClassifier")
        state = {f"{hf_model.base_model_prefix}.{k}": v for k, v in plain.backbone.state_dict().items()}
        state.update({f"score.{k}": v for k, v in plain.score.state_dict().items()})
        try:
            hf_model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise PeftlabError(f"cannot map the classifier onto {type(hf_model).__name__}: {error}") from None
        plain = hf_model
    if not isinstance(plain, PreTrainedModel):
        raise PeftlabError(f"--format merged needs a transformers model or a SequenceClassifier, got "
                           f"{type(model).__name__}")
    if architecture(plain) == "gpt2":
        convert_linear_to_conv1d(plain)
    return plain


def export_merged(model: nn.Module, directory: str | os.PathLike, tokenizer=None, record: dict | None = None,
                  overwrite: bool = False) -> Path:
    """Save `model` with its adapters merged as a plain `transformers` model (`from_pretrained` loads it).

    Args:
        model: a model with or without LoRA layers; it is not modified.
        directory: the export directory, written next to its final place and renamed into it; it must not exist,
            be empty, or be an earlier export (unless `overwrite`).
        tokenizer: saved alongside when given, so the directory is a complete model.
        record, overwrite: as for `export_peft`.
    """
    plain = merged_hf_model(model)

    def fill(staging: Path) -> None:
        plain.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return _write_export(directory, fill, "merged", record, overwrite)
