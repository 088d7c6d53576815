"""DoRA (Liu et al., 2024, "Weight-Decomposed Low-Rank Adaptation"): LoRA's update applied to the direction of the
weight, with a learned magnitude per output row.

For a frozen W0 (d×k) with LoRA factors A (r×k), B (d×r) and scaling s = alpha/r:

    V = W0 + s·B A                    the adapted direction (before normalising)
    h = m ⊙ (V x) / ‖V‖_c + b         ‖V‖_c: the L2 norm of each output row of V, treated as a constant

m starts at ‖W0‖_c, and B at zero, so step 0 is the base model. As in the paper (section 4.3) and Hugging Face
peft, the norm is detached: it carries no gradient. Merged, the layer is a plain linear layer with
W = diag(m / ‖V‖_c) V (DoRA keeps W0 while merged and restores it exactly). V and its norm are computed in W0's
dtype promoted to at least fp32. On GPT-2's fused c_attn, q/v slices get their own A, B and magnitudes
(`FusedDoRALinear`); the peft export writes such a layer as one whole-c_attn DoRA whose magnitudes are ‖W0‖_c on
the other rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.peft.base import AdapterMethod
from peftlab.peft.lora import (
    FusedLoRALinear,
    LoRALinear,
    LoRAMethod,
    LoRASettings,
    apply_adapter_specs,
    compute_dtype,
)
from peftlab.peft.targets import AdapterSpec, resolve_targets, splice_rows


class DoRAMixin:
    """DoRA's forward and merge on top of a LoRA layer's (A, B); subclasses say where the magnitudes live."""

    reads_base_weight = True  # the forward uses W0 itself (its row norms and product)

    def magnitudes(self, norm: torch.Tensor) -> torch.Tensor:
        """The full magnitude vector m (out,), given ‖V‖_c (rows without a trained magnitude keep it: scale 1)."""
        raise NotImplementedError

    def whole_layer_magnitude(self) -> torch.Tensor:
        """m over every output row, as a whole-layer DoRA holds it (rows outside q/v slices: ‖W0‖_c, scale 1)."""
        return self.magnitudes(_row_norms(self.original_weight()))

    def original_weight(self) -> torch.Tensor:
        """W0, also while merged (DoRA keeps it: the merged weight is not W0 plus something)."""
        return self._weight_before_merge if self.merged else self.base.weight

    def _direction(self, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(weight.dtype)
        return weight.to(dtype) + (lora_b.to(dtype) @ lora_a.to(dtype)) * self.scaling  # V = W0 + s·B A, (d, k)

    def _row_scale(self, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """m / ‖V‖_c with the norm detached: (out,)."""
        norm = self._direction(lora_a.detach(), lora_b.detach(), weight).norm(dim=1).detach()
        return self.magnitudes(norm).to(norm.dtype) / norm

    def _unmerged_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight
        lora_a, lora_b = self.lora_weights()
        scale = self._row_scale(lora_a, lora_b, weight).to(x.dtype)
        plain = F.linear(x, weight)  # W0 x, without the bias
        update = F.linear(F.linear(self.dropout(x).to(lora_a.dtype), lora_a), lora_b) * self.scaling
        out = scale * (plain + update.to(x.dtype))
        return out + self.base.bias if self.base.bias is not None else out

    def _keeps_base_weight(self) -> bool:
        return True  # the merged weight is not W0 plus something: W0 is kept to restore it exactly

    def _merged_weight(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight
        merged = self._row_scale(lora_a, lora_b, weight)[:, None] * self._direction(lora_a, lora_b, weight)
        return merged.to(weight.dtype)  # diag(m / ‖V‖_c) V


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return weight.detach().to(compute_dtype(weight.dtype)).norm(dim=1)  # ‖W0‖_c, one per output row


class DoRALinear(DoRAMixin, LoRALinear):
    """LoRA with weight decomposition on a whole `nn.Linear` (see the module docstring); `magnitude`: (out,)."""

    method = "dora"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        self.magnitude = nn.Parameter(_row_norms(base.weight).to(self.lora_a.dtype))

    def magnitudes(self, norm: torch.Tensor) -> torch.Tensor:
        return self.magnitude


class FusedDoRALinear(DoRAMixin, FusedLoRALinear):
    """DoRA on output slices of a fused projection (q and v of GPT-2's c_attn): each slice has its own A, B and
    magnitudes; the other rows keep m = ‖V‖_c = ‖W0‖_c, i.e. stay exactly the base layer. Row norms are per row,
    so this is DoRA on separate q and v projections."""

    method = "dora"

    def __init__(self, base: nn.Linear, slices: Mapping[str, tuple[int, int]], rank: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__(base, slices, rank, alpha, dropout)
        norms = _row_norms(base.weight)
        self.magnitude = nn.ParameterDict({name: nn.Parameter(norms[start:end].to(self.lora_a[name].dtype))
                                           for name, (start, end) in self.slices.items()})

    def magnitudes(self, norm: torch.Tensor) -> torch.Tensor:
        return splice_rows(norm, self.slices, self.magnitude)


def apply_dora(model: nn.Module, specs: Sequence[AdapterSpec], rank: int, alpha: float, dropout: float) -> list[str]:
    """LoRA's injection (its checks included) with DoRA layers."""
    return apply_adapter_specs(model, specs, rank, alpha, dropout, layer_types=(DoRALinear, FusedDoRALinear))


class DoRAMethod(AdapterMethod):
    """DoRA: A, B and the magnitudes train; targets, rank and alpha as for LoRA."""

    name = "dora"
    settings_type = LoRASettings
    mergeable = True
    module_type = DoRAMixin  # DoRALinear and FusedDoRALinear
    peft_type = "LORA"  # peft's LoRA with use_dora

    describe = LoRAMethod.describe  # "dora r8 α16 q,v": LoRA's settings under its own name
    peft_export = LoRAMethod.peft_export  # peft's LORA with use_dora, plus the magnitudes

    def inject(self, model: nn.Module, settings: LoRASettings) -> list[str]:
        return apply_dora(model, resolve_targets(model, settings.targets), settings.rank, settings.alpha,
                          settings.dropout)

    def rebuild(self, model: nn.Module, specs: Sequence[dict]) -> None:
        for item in specs:
            spec = AdapterSpec(item["module"], tuple(item["slices"]) if item.get("slices") else None)
            apply_dora(model, [spec], item["rank"], item["alpha"], item["dropout"])
