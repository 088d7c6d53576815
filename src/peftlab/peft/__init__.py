"""Parameter-efficient fine-tuning, independent of tasks, training and model heads: the adapter-method protocol
(`base`) and its methods (`lora`, `simple`: full, bitfit, head; registry: `methods`), targets by role or name
(`targets`), trainability and parameter reports (`prepare`), adapter checkpoints (`checkpoint`). Hugging Face
exports live in `peftlab.hf`.

Typical use from a notebook::

    from peftlab.models import load_model
    from peftlab.peft import apply_method, parameter_report, save_adapter

    model, tokenizer = load_model("gpt2", task="classification")
    apply_method(model, "lora", targets=["q", "v"], rank=8, alpha=16, extra_trainable=["head", "norms"])
    print(parameter_report(model))
"""

from peftlab.peft.base import (
    AdapterMethod,
    AdapterModule,
    MethodSettings,
    adapter_modules,
    disable_adapters,
    merge_adapters,
    merge_and_strip,
    unmerge_adapters,
)
from peftlab.peft.checkpoint import load_adapter, read_adapter_config, save_adapter
from peftlab.peft.lora import FusedLoRALinear, LoRALayer, LoRALinear, apply_adapters, lora_layers
from peftlab.peft.methods import METHODS, get_method
from peftlab.peft.prepare import (
    EXTRA_TRAINABLE,
    ParameterReport,
    adapter_state_dict,
    apply_method,
    mark_trainable,
    parameter_report,
)
from peftlab.peft.targets import ROLES, resolve_targets

__all__ = [
    "EXTRA_TRAINABLE",
    "METHODS",
    "ROLES",
    "AdapterMethod",
    "AdapterModule",
    "FusedLoRALinear",
    "LoRALayer",
    "LoRALinear",
    "MethodSettings",
    "ParameterReport",
    "adapter_modules",
    "adapter_state_dict",
    "apply_adapters",
    "apply_method",
    "disable_adapters",
    "get_method",
    "load_adapter",
    "lora_layers",
    "mark_trainable",
    "merge_adapters",
    "merge_and_strip",
    "parameter_report",
    "read_adapter_config",
    "resolve_targets",
    "save_adapter",
    "unmerge_adapters",
]
