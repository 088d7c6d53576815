"""LoRA layers: a frozen linear layer plus a trainable low-rank update (Hu et al., 2021).

For a frozen weight W0 of shape (d, k) the layer computes

    h = W0 x + b + (alpha / r) · B A dropout(x)        A: (r, k) Kaiming-uniform,  B: (d, r) zeros

so a freshly wrapped model computes exactly what the base model computes. Dropout acts on the LoRA branch only.

Merging folds the update into the base weight (W = W0 + (alpha/r) B A) so inference costs what the base model
costs; un-merging subtracts it again. Both are explicit (`merge()` / `unmerge()`, or `peftlab.peft.merged(model)`
around an evaluation), idempotent and guarded by the `merged` flag; `model.eval()` / `model.train()` never merge,
so base weights change only when asked. The update is computed in the weight's dtype promoted to at least fp32.
Outputs agree merged or not to fp32 rounding; a fp32 merge/unmerge round trip adds at most an ulp-level rounding
to W0 (a half-precision W0 is kept and restored exactly).

`peftlab.peft.base.disable_adapters(model)` turns every LoRA branch off by a flag, without touching weights.

`LoRAMethod` is LoRA's implementation of the adapter-method protocol (`peftlab.peft.base`): its settings
(`LoRASettings`, shared with DoRA), its report description and peft export; it injects the layers into resolved
targets (`peftlab.peft.targets`), trains their A and B, and rebuilds them from a checkpoint.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.peft.base import PEFT_KEY_PREFIX, AdapterMethod, AdapterModule, PeftExport
from peftlab.peft.targets import (
    AdapterSpec,
    architecture,
    candidates,
    linear_modules,
    parse_targets,
    resolve_targets,
    slice_rows,
)


def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a merge (and DoRA's weight norm) is computed in: the weight's, promoted to at least fp32, so a bf16
    weight gets an fp32 update (its factors are fp32) and an fp64 weight loses nothing to an fp32 detour."""
    return torch.promote_types(weight_dtype, torch.float32)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """A and B are kept in fp32 on a half-precision base (bf16 / fp16): tiny updates to small matrices would
    otherwise round away. On an fp32 base they are fp32 too."""
    return torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype


class Dropout(nn.Module):
    """Inverted dropout, like `nn.Dropout`, that draws its mask from one uniform float per element.

    `nn.Dropout` on CPU goes through `bernoulli_`, about twice as slow as `rand_like` + compare; with a mask per
    LoRA layer and step that was 5-10% of a LoRA training step. An element is dropped when u < p for
    u ~ U[0, 1) on a 2^-24 grid, so the drop probability is p to within 6e-8.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class LoRALayer(AdapterModule):
    """What every LoRA layer shares: the frozen base layer, scaling, dropout, merge/unmerge/disable.

    Subclasses define the update through `lora_weights()` returning (A, B) with A: (R, k) and B: (d, R), where
    the update is `scaling · B A`. That one pair drives the forward pass, merging and the Hugging Face export.
    """

    method = "lora"
    mergeable = True

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA wraps nn.Linear layers, got {type(base).__name__}")
        if rank <= 0:
            raise PeftlabError(f"LoRA rank must be a positive integer, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise PeftlabError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True when base.weight holds W0 + scaling · B A
        self._merged_factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._merged_fingerprint: tuple[tuple[int, int], ...] | None = None
        self._weight_before_merge: torch.Tensor | None = None
        self.train(base.training)  # the layer (and its dropout) takes the mode of the layer it replaces

    # --- the update -------------------------------------------------------------------------------------

    def lora_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with A: (R, in_features), B: (out_features, R); the update is scaling · B A."""
        raise NotImplementedError

    def _delta(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        """scaling · B A in the base weight's dtype, computed in `compute_dtype` of it."""
        dtype = compute_dtype(self.base.weight.dtype)
        delta = (lora_b.to(dtype) @ lora_a.to(dtype)) * self.scaling  # (d, R) @ (R, k) -> (d, k)
        return delta.to(self.base.weight.dtype)

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, Dropout) else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and self._lora_fingerprint() != self._merged_fingerprint:
            self._remerge()  # A or B changed while merged (optimizer step, loaded weights): fold in the new values
        if self.merged or self.disabled:
            return self.base(x)  # already includes the update when merged
        return self._unmerged_forward(x)

    def _unmerged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer with its update applied on the fly (variants such as DoRA override this)."""
        out = self.base(x)
        lora_a, lora_b = self.lora_weights()
        dropped = self.dropout(x).to(lora_a.dtype)  # (..., k); fp32 adapters on a bf16/fp16 base
        update = F.linear(F.linear(dropped, lora_a), lora_b) * self.scaling  # (..., k) -> (..., R) -> (..., d)
        return out + update.to(out.dtype)

    # --- merge / unmerge ----------------------------------------------------------------------------------
    #
    # merge() keeps a copy of the (A, B) it folded in (r·(d + k) numbers, small), and unmerge() subtracts exactly
    # that copy. So W0 is restored even if A or B were changed while merged, and a merged layer whose A or B
    # changed re-merges itself on its next forward (detected through the parameters' version counters).
    # A half-precision base keeps its W0 while merged instead (one weight copy per layer, only while merged).

    def spec(self) -> dict:
        return {"slices": list(self.slices) if isinstance(self, FusedLoRALinear) else None, "rank": self.rank,
                "alpha": self.alpha, "dropout": self.dropout_p}

    def _lora_fingerprint(self) -> tuple[tuple[int, int], ...]:
        return tuple((parameter.data_ptr(), parameter._version) for parameter in self.adapter_parameters())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight. A no-op when already merged."""
        if self.merged:
            return
        if self.disabled:
            raise PeftlabError("cannot merge a LoRA layer while adapters are disabled (inside disable_adapters)")
        lora_a, lora_b = (t.detach().clone() for t in self.lora_weights())
        if self._keeps_base_weight():
            self._weight_before_merge = self.base.weight.detach().clone()
        self.base.weight.copy_(self._merged_weight(lora_a, lora_b))
        self._merged_factors = (lora_a, lora_b)
        self._merged_fingerprint = self._lora_fingerprint()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged update from the base weight again. A no-op when not merged."""
        if not self.merged:
            return
        if self._weight_before_merge is not None:
            self.base.weight.copy_(self._weight_before_merge)
            self._weight_before_merge = None
        else:
            self.base.weight.sub_(self._delta(*self._merged_factors))
        self._merged_factors = None
        self._merged_fingerprint = None
        self.merged = False

    def _keeps_base_weight(self) -> bool:
        """Whether merge() keeps W0 to restore it exactly: bf16/fp16, where (W0 + d) - d is off by up to an ulp
        (~0.4% in bf16). In fp32 unmerge() subtracts the merged update instead."""
        return self.base.weight.dtype not in (torch.float32, torch.float64)

    def _merged_weight(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        """The base weight with the update (A, B) folded in: W0 + scaling · B A."""
        return self.base.weight + self._delta(lora_a, lora_b)

    def _remerge(self) -> None:
        self.unmerge()
        self.merge()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout_p:g}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """LoRA on a whole `nn.Linear`: ``x -> W0 x + b + (alpha / r) · B A dropout(x)``.

    Args:
        base (nn.Linear): the layer to adapt; its weight and bias are frozen.
        rank (int): r, the rank of the update; 1 <= r <= min(in_features, out_features).
        alpha (float): scaling numerator; the update is multiplied by alpha / r.
        dropout (float): dropout probability on the LoRA branch's input. Default: 0.0 (nn.Identity).

    Parameters `lora_a` (r, in_features) start Kaiming-uniform and `lora_b` (out_features, r) start at zero;
    they are fp32 when the base is bf16/fp16 (see `adapter_dtype`).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        if rank > min(base.in_features, base.out_features):
            raise PeftlabError(
                f"LoRA rank {rank} exceeds min(in, out) = {min(base.in_features, base.out_features)} "
                f"of a Linear({base.in_features} -> {base.out_features}). Fix: use a smaller --rank"
            )
        factory = {"device": base.weight.device, "dtype": adapter_dtype(base.weight.dtype)}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # a=sqrt(5) gives nn.Linear's default init: U(-1/sqrt(k), 1/sqrt(k)) with k = in_features.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def lora_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_a, self.lora_b


class FusedLoRALinear(LoRALayer):
    """LoRA on some output slices of a fused projection, e.g. q and v of GPT-2's ``c_attn = [q | k | v]``.

    Each adapted slice s (rows start:end of the output) has its own A_s (r, k) and B_s (end - start, r):

        h[start:end] = W0[start:end] x + b[start:end] + (alpha / r) · B_s A_s dropout(x)

    and slices not listed stay exactly the base layer. One dropout mask is shared by the slices. This equals one
    LoRA of rank n·r (n slices) whose A stacks the A_s and whose B is block-structured with zeros elsewhere —
    which is how it is computed and how it is exported to Hugging Face peft (with alpha n·alpha).

    Args:
        base (nn.Linear): the fused layer; frozen.
        slices (Mapping[str, tuple[int, int]]): adapted slice name -> (start, end) output rows.
        rank (int): r, per slice; 1 <= r <= min(in_features, slice size).
        alpha (float): scaling numerator; each slice's update is multiplied by alpha / r.
        dropout (float): dropout probability on the LoRA branch's input. Default: 0.0.
    """

    def __init__(
        self, base: nn.Linear, slices: Mapping[str, tuple[int, int]], rank: int, alpha: float, dropout: float = 0.0
    ):
        super().__init__(base, rank, alpha, dropout)
        if not slices:
            raise PeftlabError("FusedLoRALinear needs at least one slice")
        ordered = sorted(slices.items(), key=lambda item: item[1][0])
        previous_end = 0
        for name, (start, end) in ordered:
            if not previous_end <= start < end <= base.out_features:
                raise PeftlabError(f"slice '{name}' = rows {start}:{end} overlaps or leaves 0:{base.out_features}")
            if rank > min(base.in_features, end - start):
                raise PeftlabError(
                    f"LoRA rank {rank} exceeds min(in, out) = {min(base.in_features, end - start)} of slice '{name}'. "
                    "Fix: use a smaller --rank"
                )
            previous_end = end
        self.slices = {name: (int(start), int(end)) for name, (start, end) in ordered}
        factory = {"device": base.weight.device, "dtype": adapter_dtype(base.weight.dtype)}
        self.lora_a = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(rank, base.in_features, **factory)) for name in self.slices}
        )
        self.lora_b = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(end - start, rank, **factory)) for name, (start, end) in self.slices.items()}
        )
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        for name in self.slices:
            nn.init.kaiming_uniform_(self.lora_a[name], a=math.sqrt(5))
            nn.init.zeros_(self.lora_b[name])

    def lora_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        names = list(self.slices)
        stacked_a = torch.cat([self.lora_a[name] for name in names], dim=0)  # n x (r, k) -> (n·r, k)
        stacked_b = stacked_a.new_zeros(self.base.out_features, len(names) * self.rank)  # (d, n·r)
        for index, name in enumerate(names):
            start, end = self.slices[name]
            columns = slice(index * self.rank, (index + 1) * self.rank)
            stacked_b[start:end, columns] = self.lora_b[name]  # B_s fills its rows and its own r columns
        return stacked_a, stacked_b

    def extra_repr(self) -> str:
        return f"slices={list(self.slices)}, " + super().extra_repr()


# ----------------------------------------------------------------------------------------------------------
# Model-wide helpers


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """(name, layer) of every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def apply_adapter_specs(
    model: nn.Module, specs: Sequence[AdapterSpec], rank: int, alpha: float, dropout: float = 0.0,
    layer_types: tuple[type, type] | None = None,
) -> list[str]:
    """Wrap exactly the given modules (resolved targets) in LoRA layers; returns their descriptions.

    `layer_types`: the (whole-layer, fused-slices) classes to build, for LoRA variants such as DoRA; default
    (LoRALinear, FusedLoRALinear)."""
    whole_type, fused_type = layer_types or (LoRALinear, FusedLoRALinear)
    name = whole_type.__name__.removesuffix("Linear")  # LoRA, DoRA
    if rank <= 0:
        hint = " (rank 0 means --method full)" if whole_type is LoRALinear else ""
        raise PeftlabError(f"{name} rank must be a positive integer, got {rank}{hint}")
    linears = linear_modules(model)
    # Check every layer first so an error leaves the model untouched.
    for spec in specs:
        if spec.module not in linears:
            raise PeftlabError(f"'{spec.module}' is not an adaptable linear layer. Linear layers: {candidates(linears)}")
        linear = linears[spec.module]
        rows = slice_rows(spec.module, linear, spec.slices) if spec.slices else {"": (0, linear.out_features)}
        limit = min([linear.in_features] + [end - start for start, end in rows.values()])
        if rank > limit:
            raise PeftlabError(
                f"{name} rank {rank} is larger than min(d, k) = {limit} of {spec} "
                f"(Linear {linear.in_features} -> {linear.out_features}). Fix: use --rank <= {limit}"
            )
    for spec in specs:
        linear = linears[spec.module]
        if spec.slices:
            layer: LoRALayer = fused_type(linear, slice_rows(spec.module, linear, spec.slices), rank, alpha, dropout)
        else:
            layer = whole_type(linear, rank, alpha, dropout)
        parent_name, _, child_name = spec.module.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer)
    return [str(spec) for spec in specs]


def apply_adapters(
    model: nn.Module, targets: str | Sequence[str], rank: int, alpha: float, dropout: float = 0.0
) -> list[str]:
    """Add LoRA adapters to the targeted linear layers of `model` (in place).

    Args:
        model: any torch model; roles need a GPT-2 or Llama-family body (also inside `SequenceClassifier`).
        targets: roles `q`, `k`, `v`, `o`, `mlp`, `all-linear` (every attention and MLP linear of each block,
            never the LM head or the classifier); module names (exact, or dotted suffix: `c_attn`, `h.0.attn.c_attn`);
            or regexes, recognised by a regex character (`*+?|()[]{}^$\\`) and matched in full against module names.
            A comma-separated string works too ("q,v").
        rank: r >= 1, at most min(d, k) of every adapted layer (of every slice for GPT-2 q/k/v slices).
        alpha: the update is scaled by alpha / r.
        dropout: dropout on the LoRA branch.

    Returns:
        The adapted modules, e.g. `['transformer.h.0.attn.c_attn[q,v]', ...]` (slices in brackets).

    Only creates the layers (their base weights frozen); `mark_trainable` decides what else trains.
    """
    return apply_adapter_specs(model, resolve_targets(model, targets), rank, alpha, dropout)


@dataclass
class LoRASettings:
    """LoRA's (and DoRA's) settings; the field names are the adapter section's (config.yaml, --rank, ...)."""

    targets: tuple[str, ...] = ("all-linear",)  # roles, module names or regexes (see peft.targets); "q,v" works too
    rank: int = 8  # r; with method lora, 0 means full fine-tuning (`LoRAMethod.runs_as`)
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the LoRA branch's input

    def __post_init__(self):
        self.targets = tuple(parse_targets(self.targets))


class LoRAMethod(AdapterMethod):
    """LoRA (Hu et al., 2021) on the targeted linear layers: A and B train, the base stays frozen."""

    name = "lora"
    settings_type = LoRASettings
    mergeable = True
    module_type = LoRALayer
    peft_type = "LORA"

    def runs_as(self, settings: LoRASettings) -> str:
        return "full" if settings.rank == 0 else self.name  # the course spec: rank 0 is full fine-tuning

    def describe(self, settings: LoRASettings) -> str:
        return f"{self.name} r{settings.rank} α{settings.alpha:g} {','.join(settings.targets)}"

    def inject(self, model: nn.Module, settings: LoRASettings) -> list[str]:
        return apply_adapters(model, settings.targets, settings.rank, settings.alpha, settings.dropout)

    def rebuild(self, model: nn.Module, specs: Sequence[dict]) -> None:
        for item in specs:
            spec = AdapterSpec(item["module"], tuple(item["slices"]) if item["slices"] else None)
            apply_adapter_specs(model, [spec], item["rank"], item["alpha"], item["dropout"])

    def peft_export(self, model: nn.Module, hf_name: Callable[[str], str]) -> PeftExport:
        """LoRA and DoRA layers as peft's LORA: A, B (and DoRA's magnitudes) per layer; fused slices as one
        block-structured LoRA of rank n·r with alpha n·alpha (alpha/r unchanged); layers whose (rank, alpha)
        differ from the most common pair get `rank_pattern` / `alpha_pattern` entries."""
        layers = list(lora_layers(model))
        tensors: dict[str, torch.Tensor] = {}
        settings: dict[str, tuple[int, float]] = {}
        exported = set()
        for name, layer in layers:
            lora_a, lora_b = layer.lora_weights()  # (R, k), (d, R); R = n·r for fused slices
            exported_rank = lora_a.shape[0]
            settings[hf_name(name)] = (exported_rank, layer.alpha * exported_rank / layer.rank)  # keeps alpha / r
            key = f"{PEFT_KEY_PREFIX}{hf_name(name)}"
            tensors[f"{key}.lora_A.weight"] = lora_a.detach()
            tensors[f"{key}.lora_B.weight"] = lora_b.detach()
            if layer.method == "dora":
                tensors[f"{key}.lora_magnitude_vector"] = layer.whole_layer_magnitude().detach()
            exported.update(id(p) for p in layer.adapter_parameters())
        (rank, alpha), _ = Counter(settings.values()).most_common(1)[0]
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": alpha,
            "lora_dropout": max(layer.dropout_p for _, layer in layers),
            "target_modules": sorted(settings),
            "rank_pattern": {re.escape(name): r for name, (r, _) in settings.items() if r != rank},
            "alpha_pattern": {re.escape(name): a for name, (_, a) in settings.items() if a != alpha},
            "fan_in_fan_out": architecture(model) == "gpt2",  # HF GPT-2 keeps Conv1D, weight (in, out)
            "bias": "none",
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": layers[0][1].method == "dora",
        }
        return PeftExport(config, tensors, exported)
