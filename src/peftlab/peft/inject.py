"""Putting adapters into a model and deciding what trains.

* `apply_adapters(model, targets, rank, alpha, dropout)` wraps the targeted `nn.Linear` layers in LoRA layers.
  Targets are roles (`q`, `k`, `v`, `o`, `mlp`, `all-linear`, mapped per architecture below), module names
  (exact, or a dotted suffix such as `c_attn`) or regular expressions (full match on the module name).
* `mark_trainable(model, method, extra)` is the one place that decides `requires_grad`, by visiting modules:
  LoRA layers, norm layers (LayerNorm / RMSNorm classes), the classifier head module, bias parameters.
* `apply_method(...)` does both for the CLI; `parameter_report(model)` prints the counts people compare.

GPT-2's fused `c_attn` (rows [q | k | v]) rule: roles that cover all of q, k and v of a `c_attn` give ONE LoRA on
the whole fused layer (A: r x d, B: 3d x r; this is what the seeds count: r=128 on q,k,v of GPT-2 medium =
24 · 128 · (1024 + 3072) = 12,582,912 parameters); a strict subset (the paper's q and v) gives a separate A/B pair
per slice (`FusedLoRALinear`), each of rank r.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.peft.lora import FusedLoRALinear, LoRALayer, LoRALinear, lora_layers

ROLES = ("q", "k", "v", "o", "mlp", "all-linear")
METHODS = ("lora", "full", "bitfit", "head")
EXTRA_TRAINABLE = ("head", "biases", "norms")

# Role -> (module-name suffix, slice of a fused projection or None for the whole module), per architecture.
GPT2_ROLES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "q": (("attn.c_attn", "q"),),
    "k": (("attn.c_attn", "k"),),
    "v": (("attn.c_attn", "v"),),
    "o": (("attn.c_proj", None),),
    "mlp": (("mlp.c_fc", None), ("mlp.c_proj", None)),
}
LLAMA_ROLES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "q": (("self_attn.q_proj", None),),
    "k": (("self_attn.k_proj", None),),
    "v": (("self_attn.v_proj", None),),
    "o": (("self_attn.o_proj", None),),
    "mlp": (("mlp.gate_proj", None), ("mlp.up_proj", None), ("mlp.down_proj", None)),
}
ROLE_MAPS = {"gpt2": GPT2_ROLES, "llama": LLAMA_ROLES}
# Fused projections: suffix -> slice names in output-row order (equal thirds).
FUSED_SLICES = {"attn.c_attn": ("q", "k", "v")}
_REGEX_CHARACTERS = set("*+?|()[]{}^$\\")


@dataclass(frozen=True)
class AdapterSpec:
    """One resolved adapter: a module name and, for a fused projection, the adapted slices (None = whole)."""

    module: str
    slices: tuple[str, ...] | None = None

    def __str__(self) -> str:
        return f"{self.module}[{','.join(self.slices)}]" if self.slices else self.module


# ----------------------------------------------------------------------------------------------------------
# Targets


def architecture(model: nn.Module) -> str | None:
    """'gpt2', 'llama' (Llama family: q_proj/k_proj/v_proj/o_proj + gate/up/down) or None, from module names."""
    names = [name for name, _ in model.named_modules()]
    if any(_has_suffix(name, "attn.c_attn") for name in names):
        return "gpt2"
    if any(_has_suffix(name, "self_attn.q_proj") for name in names):
        return "llama"
    return None


def _has_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Adaptable linear layers by name: nn.Linear modules that are not already inside a LoRA layer."""
    inside_lora = {id(module) for _, layer in lora_layers(model) for module in layer.modules()}
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) not in inside_lora
    }


def _candidates(names: Iterable[str]) -> str:
    """Module names with layer indices folded (h.0, h.1, ... -> h.*), for error messages."""
    folded = sorted({re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names})
    return ", ".join(folded) if folded else "(none)"


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """'q,v' or ['q', 'v'] -> ['q', 'v'] (whitespace and empty items dropped)."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    return [item.strip() for item in items if item.strip()]


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[AdapterSpec]:
    """Turn roles / names / regexes into the list of modules (and fused slices) to adapt; an item that matches no
    linear layer is an error naming it."""
    items = parse_targets(targets)
    if not items:
        raise PeftlabError(f"no adapter targets given: expected roles ({', '.join(ROLES)}), module names or regexes")
    linears = _linear_modules(model)
    adapted = {name for name, _ in lora_layers(model)}
    arch = architecture(model)
    whole: set[str] = set()
    sliced: dict[str, set[str]] = {}
    for item in items:
        if item in ROLES:
            if arch is None:
                raise PeftlabError(
                    f"target role '{item}' is defined for GPT-2 and Llama-family models only; this model is neither. "
                    f"Fix: name the modules instead (a name, a dotted suffix or a regex). Linear layers: "
                    f"{_candidates(linears)}"
                )
            roles = ("q", "k", "v", "o", "mlp") if item == "all-linear" else (item,)
            found = False
            for role in roles:
                for suffix, slice_name in ROLE_MAPS[arch][role]:
                    already = [name for name in adapted if _has_suffix(name, suffix)]
                    if already:
                        raise PeftlabError(
                            f"target '{item}' maps onto layers that already have a LoRA adapter: "
                            f"{_candidates(already)}. Fix: give all targets in one apply_adapters call"
                        )
                    for name in linears:
                        if _has_suffix(name, suffix):
                            found = True
                            if slice_name is None:
                                whole.add(name)
                            else:
                                sliced.setdefault(name, set()).add(slice_name)
            if not found:
                raise _matched_nothing(item, linears)
            continue
        is_regex = any(character in _REGEX_CHARACTERS for character in item)
        if is_regex:
            try:
                pattern = re.compile(item)
            except re.error as error:
                raise PeftlabError(f"target '{item}' is not a valid regular expression: {error}") from None
            matched = [name for name in linears if pattern.fullmatch(name)]
        else:
            matched = [name for name in linears if _has_suffix(name, item)]
            non_linear = [
                name for name, module in model.named_modules()
                if _has_suffix(name, item) and name not in linears and name not in adapted
                and not isinstance(module, LoRALayer)
            ]
            if non_linear and not matched:
                raise PeftlabError(
                    f"target '{item}' names module(s) that are not linear layers: {_candidates(non_linear)}. "
                    f"Linear layers: {_candidates(linears)}"
                )
        already = [name for name in adapted if (pattern.fullmatch(name) if is_regex else _has_suffix(name, item))]
        if already:
            raise PeftlabError(f"target '{item}' matches layers that already have a LoRA adapter: {_candidates(already)}")
        if not matched:  # every item must count: a typo beside a valid target would otherwise be dropped silently
            raise _matched_nothing(item, linears)
        whole.update(matched)

    specs = []
    for name in [name for name in linears if name in whole or name in sliced]:  # in the model's order
        slice_names = sliced.get(name, set())
        layout = next((FUSED_SLICES[suffix] for suffix in FUSED_SLICES if _has_suffix(name, suffix)), ())
        if name in whole or set(layout) <= slice_names:
            specs.append(AdapterSpec(name))  # q, k and v together: one LoRA on the whole fused layer
        else:
            specs.append(AdapterSpec(name, tuple(s for s in layout if s in slice_names)))
    return specs


def _matched_nothing(item: str, linears: dict[str, nn.Linear]) -> PeftlabError:
    return PeftlabError(f"target '{item}' matched no linear layer of this model. Roles: {', '.join(ROLES)}; or module "
                        f"names / regexes among: {_candidates(linears)}")


def _slice_rows(name: str, linear: nn.Linear, slice_names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    layout = next(FUSED_SLICES[suffix] for suffix in FUSED_SLICES if _has_suffix(name, suffix))
    if linear.out_features % len(layout):
        raise PeftlabError(f"{name}: {linear.out_features} output rows do not split into {len(layout)} equal slices")
    size = linear.out_features // len(layout)
    return {slice_name: (layout.index(slice_name) * size, (layout.index(slice_name) + 1) * size) for slice_name in slice_names}


def apply_adapter_specs(
    model: nn.Module, specs: Sequence[AdapterSpec], rank: int, alpha: float, dropout: float = 0.0
) -> list[str]:
    """Wrap exactly the given modules (resolved targets) in LoRA layers; returns their descriptions."""
    if rank <= 0:
        raise PeftlabError(f"LoRA rank must be a positive integer, got {rank} (rank 0 means --method full)")
    linears = _linear_modules(model)
    # Check every layer first so an error leaves the model untouched.
    for spec in specs:
        if spec.module not in linears:
            raise PeftlabError(f"'{spec.module}' is not an adaptable linear layer. Linear layers: {_candidates(linears)}")
        linear = linears[spec.module]
        rows = _slice_rows(spec.module, linear, spec.slices) if spec.slices else {"": (0, linear.out_features)}
        limit = min([linear.in_features] + [end - start for start, end in rows.values()])
        if rank > limit:
            raise PeftlabError(
                f"LoRA rank {rank} is larger than min(d, k) = {limit} of {spec} "
                f"(Linear {linear.in_features} -> {linear.out_features}). Fix: use --rank <= {limit}"
            )
    for spec in specs:
        linear = linears[spec.module]
        if spec.slices:
            layer: LoRALayer = FusedLoRALinear(linear, _slice_rows(spec.module, linear, spec.slices), rank, alpha, dropout)
        else:
            layer = LoRALinear(linear, rank, alpha, dropout)
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


def adapter_specs(model: nn.Module) -> list[dict]:
    """The LoRA layers of a model as plain data (module, slices, rank, alpha, dropout), for checkpoints."""
    return [
        {
            "module": name,
            "slices": list(layer.slices) if isinstance(layer, FusedLoRALinear) else None,
            "rank": layer.rank,
            "alpha": layer.alpha,
            "dropout": layer.dropout_p,
        }
        for name, layer in lora_layers(model)
    ]


# ----------------------------------------------------------------------------------------------------------
# Trainability: the one place that sets requires_grad


def classifier_head(model: nn.Module) -> nn.Module | None:
    """The classification head: the root module's `score` (peftlab SequenceClassifier, HF *ForSequenceClassification)
    or `classifier` submodule; None for language models."""
    for attribute in ("score", "classifier"):
        module = getattr(model, attribute, None)
        if isinstance(module, nn.Module):
            return module
    return None


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm layers, including model-specific classes such as LlamaRMSNorm."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _bias_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [module.bias for module in model.modules() if isinstance(getattr(module, "bias", None), nn.Parameter)]


def mark_trainable(
    model: nn.Module, method: str = "lora", extra: Sequence[str] | None = None
) -> list[str]:
    """Set `requires_grad` on every parameter for a fine-tuning method; returns the trainable parameter names.

    Args:
        model: the model (with LoRA layers for method "lora").
        method: "lora" (the LoRA A/B matrices), "full" (everything), "bitfit" (every bias), "head" (the classifier
            head only).
        extra: what else trains: any of "head", "biases", "norms". None means "head" when the model has a
            classifier head (a random head must learn), else nothing.

    Everything not selected is frozen. Selection visits modules (LoRA layers, norm classes, the head module,
    `bias` parameters); parameter names are never pattern-matched.
    """
    if method not in METHODS:
        raise PeftlabError(f"unknown method '{method}': expected one of {', '.join(METHODS)}")
    head = classifier_head(model)
    if extra is None:
        extra = ("head",) if head is not None else ()
    unknown = [item for item in extra if item not in EXTRA_TRAINABLE]
    if unknown:
        raise PeftlabError(f"unknown extra trainable {unknown}: expected any of {', '.join(EXTRA_TRAINABLE)}")
    layers = [layer for _, layer in lora_layers(model)]
    if method == "lora" and not layers:
        raise PeftlabError("method 'lora' but the model has no LoRA layers. Fix: apply_adapters(model, ...) first")
    if method == "full" and layers:
        raise PeftlabError("method 'full' trains the plain model; this one has LoRA layers. Fix: load it without adapters")
    if head is None and (method == "head" or "head" in extra):
        raise PeftlabError("no classifier head to train: this is not a classification model (expected a `score` module)")

    selected: list[nn.Parameter] = []
    if method == "full":
        selected += list(model.parameters())
    if method == "lora":
        selected += [parameter for layer in layers for parameter in layer.lora_parameters()]
    if method == "bitfit" or "biases" in extra:
        selected += _bias_parameters(model)
    if method == "head" or "head" in extra:
        selected += list(head.parameters())
    if "norms" in extra:
        selected += [parameter for module in model.modules() if is_norm(module) for parameter in module.parameters()]

    chosen = {id(parameter) for parameter in selected}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def apply_method(
    model: nn.Module,
    method: str = "lora",
    targets: str | Sequence[str] = ("all-linear",),
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    extra_trainable: Sequence[str] | None = None,
) -> list[str]:
    """Prepare a model for fine-tuning with one method (the CLI's entry point); returns the adapted modules.

    Args:
        model: the loaded model (e.g. from `peftlab.models.load_model`).
        method: "lora", "full", "bitfit" or "head" (see `mark_trainable`). "lora" with rank 0 is full
            fine-tuning, as in the course spec.
        targets, rank, alpha, dropout: the LoRA settings (see `apply_adapters`); ignored by the other methods.
        extra_trainable: "head", "biases", "norms" to train as well; None = the head of a classifier.

    Print `parameter_report(model)` afterwards for the counts.
    """
    if method not in METHODS:
        raise PeftlabError(f"unknown method '{method}': expected one of {', '.join(METHODS)}")
    adapted: list[str] = []
    if method == "lora" and rank == 0:
        method = "full"
    elif method == "lora":
        adapted = apply_adapters(model, targets, rank, alpha, dropout)
    mark_trainable(model, method, extra_trainable)
    return adapted


# ----------------------------------------------------------------------------------------------------------
# Counting


@dataclass(frozen=True)
class ParameterReport:
    """Parameter counts as people compare them. total counts distinct parameters, adapters included."""

    total: int
    trainable: int
    adapter: int

    @property
    def reduction(self) -> float:
        """1 - trainable / total, as a fraction."""
        return 1.0 - self.trainable / self.total if self.total else 0.0

    def lines(self) -> list[str]:
        return [
            f"Number of parameters: {self.total / 1e6:.2f}M",
            f"Trainable parameters: {self.trainable / 1e6:.2f}M ({self.trainable:,})",
            f"Adapter parameters: {self.adapter:,}",
            f"Reduction: {self.reduction * 100:.2f}%",
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def parameter_report(model: nn.Module) -> ParameterReport:
    """Total, trainable and LoRA-adapter parameter counts of a model (tied weights counted once)."""
    parameters = list(model.parameters())  # distinct tensors
    adapter_ids = {id(p) for _, layer in lora_layers(model) for p in layer.lora_parameters()}
    return ParameterReport(
        total=sum(p.numel() for p in parameters),
        trainable=sum(p.numel() for p in parameters if p.requires_grad),
        adapter=sum(p.numel() for p in parameters if id(p) in adapter_ids),
    )


# ----------------------------------------------------------------------------------------------------------
# Adapter state: what a checkpoint holds


def canonical_parameter_names(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by the name they have in the plain (adapter-free) model; LoRA tensors keep their own names.

    A LoRA layer's frozen base parameters live at `<module>.base.weight`; their canonical name is
    `<module>.weight`, so checkpoints of trained biases load whether or not adapters exist yet.
    """
    renamed: dict[int, str] = {}
    for name, layer in lora_layers(model):
        prefix = f"{name}." if name else ""
        for parameter_name, parameter in layer.base.named_parameters():
            renamed[id(parameter)] = prefix + parameter_name
    return {renamed.get(id(parameter), name): parameter for name, parameter in model.named_parameters()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a fine-tuned model adds to its base: LoRA A/B plus every other trainable tensor (head, biases,
    norms), by canonical name, detached."""
    adapter_ids = {id(p) for _, layer in lora_layers(model) for p in layer.lora_parameters()}
    return {
        name: parameter.detach()
        for name, parameter in canonical_parameter_names(model).items()
        if parameter.requires_grad or id(parameter) in adapter_ids
    }
