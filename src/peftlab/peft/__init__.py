"""Parameter-efficient fine-tuning, independent of tasks and training: LoRA layers, injection by role or name,
trainability per method, parameter reports, adapter checkpoints and Hugging Face exports.

Typical use from a notebook::

    from peftlab.models import load_model
    from peftlab.peft import apply_method, parameter_report, save_adapter

    model, tokenizer = load_model("gpt2", task="classification")
    apply_method(model, "lora", targets=["q", "v"], rank=8, alpha=16, extra_trainable=["head", "norms"])
    print(parameter_report(model))
"""

from peftlab.peft.checkpoint import load_adapter, read_adapter_config, save_adapter
from peftlab.peft.export import convert_linear_to_conv1d, export_merged, export_peft, merged_hf_model
from peftlab.peft.inject import (
    EXTRA_TRAINABLE,
    METHODS,
    ROLES,
    ParameterReport,
    adapter_state_dict,
    apply_adapters,
    apply_method,
    mark_trainable,
    parameter_report,
)
from peftlab.peft.lora import (
    FusedLoRALinear,
    LoRALayer,
    LoRALinear,
    disable_adapters,
    lora_layers,
    merge_adapters,
    merge_and_strip,
    unmerge_adapters,
)

__all__ = [
    "EXTRA_TRAINABLE",
    "METHODS",
    "ROLES",
    "FusedLoRALinear",
    "LoRALayer",
    "LoRALinear",
    "ParameterReport",
    "adapter_state_dict",
    "apply_adapters",
    "apply_method",
    "convert_linear_to_conv1d",
    "disable_adapters",
    "export_merged",
    "export_peft",
    "load_adapter",
    "lora_layers",
    "mark_trainable",
    "merge_adapters",
    "merge_and_strip",
    "merged_hf_model",
    "parameter_report",
    "read_adapter_config",
    "save_adapter",
    "unmerge_adapters",
]
