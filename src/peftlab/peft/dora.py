"""DoRA (Liu et al., 2024, "Weight-Decomposed Low-Rank Adaptation"): LoRA's update applied to the direction of the
weight, with a learned magnitude per output row.

For a frozen W0 (d×k) with LoRA factors A (r×k), B (d×r) and scaling s = alpha/r:

    V = W0 + s·B A                    the adapted direction (before normalising)
    h = m ⊙ (V x) / ‖V‖_c + b         ‖V‖_c: the L2 norm of each output row of V, treated as a constant

m starts at ‖W0‖_c, and B at zero, so step 0 is the base model. As in the paper (section 4.3) and Hugging Face
peft, the norm is detached: it carries no gradient. Merged, the layer is a plain linear layer with
W = diag(m / ‖V‖_c) V. DoRA adapts whole linear layers (GPT-2's c_attn as a whole, not its q/v slices).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.peft.base import AdapterMethod, MethodSettings
from peftlab.peft.lora import LoRALinear
from peftlab.peft.targets import AdapterSpec, linear_modules, resolve_targets


class DoRALinear(LoRALinear):
    """LoRA with weight decomposition on a whole `nn.Linear` (see the module docstring); `magnitude`: (out,)."""

    method = "dora"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        with torch.no_grad():
            norms = base.weight.detach().float().norm(dim=1)  # ‖W0‖_c, one per output row
        self.magnitude = nn.Parameter(norms.to(self.lora_a.dtype))
        self.train(self.training)

    def _direction(self, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() + (lora_b.float() @ lora_a.float()) * self.scaling  # V = W0 + s·B A, (d, k)

    def _row_scale(self, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """m / ‖V‖_c with the norm detached: (out,)."""
        norm = self._direction(lora_a.detach(), lora_b.detach(), weight).norm(dim=1).detach()
        return self.magnitude.float() / norm

    def _unmerged_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight
        scale = self._row_scale(self.lora_a, self.lora_b, weight).to(x.dtype)
        plain = F.linear(x, weight)  # W0 x, without the bias
        update = F.linear(F.linear(self.dropout(x).to(self.lora_a.dtype), self.lora_a), self.lora_b) * self.scaling
        out = scale * (plain + update.to(x.dtype))
        return out + self.base.bias if self.base.bias is not None else out

    def train(self, mode: bool = True) -> "DoRALinear":
        if "magnitude" not in self._parameters:  # LoRALinear.__init__ runs this before m exists: nothing to merge yet
            return nn.Module.train(self, mode)
        return super().train(mode)

    def _keeps_base_weight(self) -> bool:
        return True  # the merged weight is not W0 plus something: W0 is kept to restore it exactly

    def _merged_weight(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight
        merged = self._row_scale(lora_a, lora_b, weight)[:, None] * self._direction(lora_a, lora_b, weight)
        return merged.to(weight.dtype)  # diag(m / ‖V‖_c) V


def apply_dora(model: nn.Module, specs: Sequence[AdapterSpec], rank: int, alpha: float, dropout: float) -> list[str]:
    if rank <= 0:
        raise PeftlabError(f"DoRA rank must be a positive integer, got {rank}")
    linears = linear_modules(model)
    sliced = [str(spec) for spec in specs if spec.slices]
    if sliced:
        raise PeftlabError(f"DoRA adapts whole linear layers, not slices of a fused projection: {sliced[:3]}. Fix: "
                           "target the whole module (e.g. q,k,v together, or c_attn), or use --method lora")
    for spec in specs:
        if spec.module not in linears:
            raise PeftlabError(f"'{spec.module}' is not an adaptable linear layer")
    for spec in specs:
        parent, _, child = spec.module.rpartition(".")
        setattr(model.get_submodule(parent), child, DoRALinear(linears[spec.module], rank, alpha, dropout))
    return [str(spec) for spec in specs]


class DoRAMethod(AdapterMethod):
    """DoRA: A, B and the magnitudes train; targets, rank and alpha as for LoRA."""

    name = "dora"
    mergeable = True
    module_type = DoRALinear

    def inject(self, model: nn.Module, settings: MethodSettings) -> list[str]:
        return apply_dora(model, resolve_targets(model, settings.targets), settings.rank, settings.alpha,
                          settings.dropout)

    def rebuild(self, model: nn.Module, specs: Sequence[dict]) -> None:
        for item in specs:
            apply_dora(model, [AdapterSpec(item["module"])], item["rank"], item["alpha"], item["dropout"])
