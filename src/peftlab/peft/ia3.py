"""IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors that rescale activations, initialised to ones so step 0 is the base model.

On an attention projection (keys, values) the vector l scales the layer's output, bias included:

    h = l ⊙ (W x + b)                         merged: W' = diag(l) W,  b' = l ⊙ b

On the MLP's down projection it scales the input, i.e. the MLP's intermediate activation (the paper's l_ff):

    h = W (l ⊙ x) + b                         merged: W' = W diag(l)

which is what Hugging Face peft does with `feedforward_modules`. On GPT-2's fused `c_attn` = [q | k | v] the
k and v slices get their own vectors and q is left unscaled (peft can only scale the whole c_attn; naming the
module `c_attn` as a target gives that). Merging is explicit (`merge()` / `merge_adapters`), divides back on
`unmerge()`, and refuses a vector with a zero entry, which could not be divided back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.peft.base import PEFT_KEY_PREFIX, AdapterMethod, AdapterModule, PeftExport, adapter_modules
from peftlab.peft.targets import (
    AdapterSpec,
    architecture,
    has_suffix,
    linear_modules,
    parse_targets,
    resolve_targets,
    slice_rows,
    splice_rows,
)

DOWN_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj")  # Llama, GPT-2: the MLP layer whose input is the intermediate


class IA3Linear(AdapterModule):
    """IA3 on one `nn.Linear`: output scaling (attention) or input scaling (`feedforward`, the MLP's down
    projection); `slices` (output rows) restricts output scaling to parts of a fused projection."""

    method = "ia3"
    mergeable = True

    def __init__(self, base: nn.Linear, feedforward: bool, slices: Mapping[str, tuple[int, int]] | None = None):
        super().__init__()
        if feedforward and slices:
            raise PeftlabError("IA3 scales the whole input of a feedforward layer; it has no output slices")
        self.base, self.feedforward = base, feedforward
        base.requires_grad_(False)
        self.slices = dict(slices) if slices else None
        factory = {"device": base.weight.device, "dtype": torch.float32}
        if self.slices:
            self.ia3_l = nn.ParameterDict({name: nn.Parameter(torch.ones(end - start, **factory))
                                           for name, (start, end) in self.slices.items()})
        else:
            self.ia3_l = nn.Parameter(torch.ones(base.in_features if feedforward else base.out_features, **factory))
        self.merged = False

    def scale_vector(self) -> torch.Tensor:
        """The full scaling vector (in_features for feedforward, else out_features; ones outside the slices)."""
        if not self.slices:
            return self.ia3_l
        ones = next(iter(self.ia3_l.values())).new_ones(self.base.out_features)
        return splice_rows(ones, self.slices, self.ia3_l)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base(x)
        scale = self.scale_vector().to(x.dtype)
        if self.feedforward:
            return self.base(x * scale)  # (..., in) scaled per input feature
        return self.base(x) * scale  # (..., out) scaled per output feature, bias included

    def spec(self) -> dict:
        return {"feedforward": self.feedforward, "slices": list(self.slices) if self.slices else None}

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.disabled:
            raise PeftlabError("cannot merge an IA3 layer while adapters are disabled (inside disable_adapters)")
        scale = self.scale_vector().detach().clone()
        if bool((scale == 0).any()):
            raise PeftlabError("an IA3 vector has a zero entry: merging could not be undone; keep it unmerged")
        self._merged_scale = scale
        self._scale_weights(scale)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._scale_weights(1.0 / self._merged_scale)
        self.merged = False

    def _scale_weights(self, scale: torch.Tensor) -> None:
        weight = self.base.weight
        if self.feedforward:
            weight.mul_(scale.to(weight.dtype)[None, :])  # (out, in) · (1, in)
        else:
            weight.mul_(scale.to(weight.dtype)[:, None])  # (out, in) · (out, 1)
            if self.base.bias is not None:
                self.base.bias.mul_(scale.to(weight.dtype))

    def extra_repr(self) -> str:
        where = "input" if self.feedforward else f"output{'' if not self.slices else ' ' + str(list(self.slices))}"
        return f"scales={where}, merged={self.merged}"


def is_down_projection(name: str) -> bool:
    return any(has_suffix(name, suffix) for suffix in DOWN_PROJECTIONS)


def apply_ia3(model: nn.Module, specs: Sequence[AdapterSpec]) -> list[str]:
    """Wrap the given modules in IA3 layers (input scaling on MLP down projections, output scaling elsewhere)."""
    linears = linear_modules(model)
    missing = [spec.module for spec in specs if spec.module not in linears]
    if missing:
        raise PeftlabError(f"IA3 needs linear layers; not linear: {missing[:5]}")
    for spec in specs:
        linear = linears[spec.module]
        feedforward = is_down_projection(spec.module)
        slices = slice_rows(spec.module, linear, spec.slices) if spec.slices else None
        parent, _, child = spec.module.rpartition(".")
        setattr(model.get_submodule(parent), child, IA3Linear(linear, feedforward, slices))
    return [str(spec) for spec in specs]


@dataclass
class IA3Settings:
    """IA3's one setting; the field name is the adapter section's."""

    targets: tuple[str, ...] = ("all-linear",)  # as for LoRA; the paper's choice is k,v,down

    def __post_init__(self):
        self.targets = tuple(parse_targets(self.targets))


class IA3Method(AdapterMethod):
    """IA3: the scaling vectors train, everything else stays frozen. Targets as for LoRA; the paper's choice is
    `k,v,down` (keys, values and the MLP intermediate)."""

    name = "ia3"
    settings_type = IA3Settings
    mergeable = True
    module_type = IA3Linear
    peft_type = "IA3"

    def describe(self, settings: IA3Settings) -> str:
        return f"{self.name} {','.join(settings.targets)}"

    def inject(self, model: nn.Module, settings: IA3Settings) -> list[str]:
        return apply_ia3(model, resolve_targets(model, settings.targets))

    def rebuild(self, model: nn.Module, specs: Sequence[dict]) -> None:
        resolved = [AdapterSpec(item["module"], tuple(item["slices"]) if item["slices"] else None) for item in specs]
        apply_ia3(model, resolved)
        for item, spec in zip(specs, resolved):
            if model.get_submodule(spec.module).feedforward != item["feedforward"]:
                raise PeftlabError(f"{spec.module}: the checkpoint scales its {'input' if item['feedforward'] else 'output'}"
                                   ", this model's IA3 would not")

    def peft_export(self, model: nn.Module, hf_name: Callable[[str], str]) -> PeftExport:
        """One vector per layer, (out, 1) for output scaling and (1, in) for a feedforward layer's input; k/v slices of
        GPT-2's c_attn become one c_attn vector with ones on the q rows (the same scaling)."""
        tensors: dict[str, torch.Tensor] = {}
        targets, feedforward, exported = [], [], set()
        for name, layer in adapter_modules(model):
            vector = layer.scale_vector().detach()
            shaped = vector[None, :] if layer.feedforward else vector[:, None]  # (1, in) or (out, 1)
            tensors[f"{PEFT_KEY_PREFIX}{hf_name(name)}.ia3_l"] = shaped
            targets.append(hf_name(name))
            if layer.feedforward:
                feedforward.append(hf_name(name))
            exported.update(id(p) for p in layer.adapter_parameters())
        config = {"peft_type": self.peft_type, "target_modules": sorted(targets),
                  "feedforward_modules": sorted(feedforward), "fan_in_fan_out": architecture(model) == "gpt2",
                  "init_ia3_weights": True}
        return PeftExport(config, tensors, exported)
