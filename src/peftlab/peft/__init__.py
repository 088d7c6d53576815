"""Parameter-efficient fine-tuning, independent of tasks, training and model heads: the adapter-method protocol
(`base`) and its methods, one file each owning its settings, report description and peft export (`lora`, `dora`,
`ia3`, `bottleneck`, `prefix`, `simple`: full, bitfit, head; registry: `methods`), targets by role or name
(`targets`), trainability and parameter reports (`prepare`), adapter checkpoints (`checkpoint`). The Hugging Face
export files are written by `peftlab.hf`.

Adapter state is explicit: evaluation runs unmerged; `with merged(model):` is merged evaluation, asked for.

Typical use from a notebook::

    from peftlab.models import load_model
    from peftlab.peft import apply_method, merged, parameter_report

    model, tokenizer = load_model("gpt2", task="classification")
    apply_method(model, {"method": "lora", "targets": ["q", "v"], "rank": 8, "alpha": 16,
                         "extra_trainable": ["head", "norms"]})
    print(parameter_report(model))
    with merged(model):  # optional: inference at the base model's cost
        ...
"""

from peftlab.peft.base import (
    AdapterMethod,
    AdapterModule,
    NoSettings,
    PeftExport,
    adapter_modules,
    disable_adapters,
    merge_adapters,
    merge_and_strip,
    merged,
    read_setting,
    unmerge_adapters,
)
from peftlab.peft.bottleneck import BottleneckSettings
from peftlab.peft.checkpoint import load_adapter, read_adapter_config, save_adapter
from peftlab.peft.ia3 import IA3Settings
from peftlab.peft.lora import FusedLoRALinear, LoRALayer, LoRALinear, LoRASettings, apply_adapters, lora_layers
from peftlab.peft.methods import METHODS, get_method, method_for
from peftlab.peft.prefix import PrefixSettings
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
    "BottleneckSettings",
    "FusedLoRALinear",
    "IA3Settings",
    "LoRALayer",
    "LoRALinear",
    "LoRASettings",
    "NoSettings",
    "ParameterReport",
    "PeftExport",
    "PrefixSettings",
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
    "merged",
    "method_for",
    "parameter_report",
    "read_adapter_config",
    "read_setting",
    "resolve_targets",
    "save_adapter",
    "unmerge_adapters",
]
