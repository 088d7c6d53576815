"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021): a small residual MLP on a sub-layer's output.

For the output a (width d) of a block's attention output projection or of its MLP, before the residual add:

    a + W_up f(W_down a + b_down) + b_up        W_down: (m, d), W_up: (d, m), f: the non-linearity

W_up and b_up start at zero, so step 0 is exactly the base model; an adapter has 2·m·d + d + m parameters.
Houlsby placement puts one after the attention output projection and one after the MLP of every block;
Pfeiffer placement only the one after the MLP. The adapter wraps the projection that produces a (attention: o_proj
/ attn.c_proj; MLP: down_proj / mlp.c_proj), so it acts exactly there on GPT-2 and Llama models alike. Not
mergeable (the non-linearity), and Hugging Face peft has no such method to export to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.peft.base import AdapterMethod, AdapterModule
from peftlab.peft.targets import ROLE_MAPS, architecture, has_suffix, linear_modules

PLACEMENTS = {"houlsby": ("o", "down"), "pfeiffer": ("down",)}  # roles whose output gets an adapter
NONLINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class BottleneckAdapter(AdapterModule):
    """`base` (a linear layer, frozen) followed by a residual bottleneck MLP of width `size` on its output."""

    method = "adapter"

    def __init__(self, base: nn.Linear, size: int, nonlinearity: str = "relu"):
        super().__init__()
        if size < 1:
            raise PeftlabError(f"--adapter-size must be >= 1, got {size}")
        if nonlinearity not in NONLINEARITIES:
            raise PeftlabError(f"unknown adapter non-linearity '{nonlinearity}': expected one of "
                               f"{', '.join(NONLINEARITIES)}")
        self.base, self.size, self.nonlinearity = base, size, nonlinearity
        base.requires_grad_(False)
        width = base.out_features
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.down = nn.Linear(width, size, **factory)  # W_down: (m, d), b_down: (m,)
        self.up = nn.Linear(size, width, **factory)  # W_up: (d, m), b_up: (d,)
        self.activation = NONLINEARITIES[nonlinearity]()
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.base(x)  # (..., d)
        if self.disabled:
            return a
        update = self.up(self.activation(self.down(a.to(self.down.weight.dtype))))  # (..., d) -> (..., m) -> (..., d)
        return a + update.to(a.dtype)

    def spec(self) -> dict:
        return {"size": self.size, "nonlinearity": self.nonlinearity}


def placement_modules(model: nn.Module, placement: str) -> list[str]:
    """The linear layers whose outputs get adapters under `placement` (houlsby | pfeiffer)."""
    if placement not in PLACEMENTS:
        raise PeftlabError(f"unknown --adapter-placement '{placement}': expected one of {', '.join(PLACEMENTS)}")
    arch = architecture(model)
    if arch is None:
        raise PeftlabError("bottleneck adapters are placed by role: the model must be GPT-2 or Llama-family")
    suffixes = [suffix for role in PLACEMENTS[placement] for suffix, _ in ROLE_MAPS[arch][role]]
    return [name for name in linear_modules(model) if any(has_suffix(name, suffix) for suffix in suffixes)]


def apply_bottleneck(model: nn.Module, modules: Sequence[str], size: int, nonlinearity: str) -> list[str]:
    linears = linear_modules(model)
    for name in modules:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, BottleneckAdapter(linears[name], size, nonlinearity))
    return list(modules)


@dataclass
class BottleneckSettings:
    """The bottleneck adapters' settings; the field names are the adapter section's (--adapter-size, ...), prefixed
    because that section is shared by every method."""

    adapter_size: int = 64  # m, the bottleneck width
    adapter_placement: str = "houlsby"  # houlsby | pfeiffer (see PLACEMENTS)
    adapter_nonlinearity: str = "relu"  # see NONLINEARITIES


class BottleneckMethod(AdapterMethod):
    """Houlsby / Pfeiffer adapters (`adapter_placement`, `adapter_size`, `adapter_nonlinearity`): only the
    adapters train."""

    name = "adapter"
    settings_type = BottleneckSettings
    module_type = BottleneckAdapter

    def describe(self, settings: BottleneckSettings) -> str:
        return f"{self.name} {settings.adapter_placement} m{settings.adapter_size} {settings.adapter_nonlinearity}"

    def inject(self, model: nn.Module, settings: BottleneckSettings) -> list[str]:
        modules = placement_modules(model, settings.adapter_placement)
        return apply_bottleneck(model, modules, settings.adapter_size, settings.adapter_nonlinearity)

    def rebuild(self, model: nn.Module, specs: Sequence[dict]) -> None:
        for item in specs:
            apply_bottleneck(model, [item["module"]], item["size"], item["nonlinearity"])
