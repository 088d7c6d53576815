"""Which layers an adapter goes into: roles, module names and regular expressions, resolved per architecture.

Targets are roles (`q`, `k`, `v`, `o`, `mlp`, `all-linear`, mapped per architecture below), module names (exact,
or a dotted suffix such as `c_attn`) or regular expressions (full match on the module name). Every item must
match at least one linear layer.

GPT-2's fused `c_attn` (rows [q | k | v]) rule: roles that cover all of q, k and v of a `c_attn` give ONE adapter
on the whole fused layer; a strict subset (the LoRA paper's q and v) gives the adapter per slice (`AdapterSpec`
with `slices`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.peft.base import AdapterModule, adapter_modules

ROLES = ("q", "k", "v", "o", "mlp", "down", "all-linear")  # down: the MLP down projection alone

# Role -> (module-name suffix, slice of a fused projection or None for the whole module), per architecture.
GPT2_ROLES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "q": (("attn.c_attn", "q"),),
    "k": (("attn.c_attn", "k"),),
    "v": (("attn.c_attn", "v"),),
    "o": (("attn.c_proj", None),),
    "mlp": (("mlp.c_fc", None), ("mlp.c_proj", None)),
    "down": (("mlp.c_proj", None),),
}
LLAMA_ROLES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "q": (("self_attn.q_proj", None),),
    "k": (("self_attn.k_proj", None),),
    "v": (("self_attn.v_proj", None),),
    "o": (("self_attn.o_proj", None),),
    "mlp": (("mlp.gate_proj", None), ("mlp.up_proj", None), ("mlp.down_proj", None)),
    "down": (("mlp.down_proj", None),),
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
    if any(has_suffix(name, "attn.c_attn") for name in names):
        return "gpt2"
    if any(has_suffix(name, "self_attn.q_proj") for name in names):
        return "llama"
    return None


def has_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Adaptable linear layers by name: nn.Linear modules that are not already inside an adapter module."""
    inside = {id(module) for _, adapter in adapter_modules(model) for module in adapter.modules()}
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) not in inside
    }


def candidates(names: Iterable[str]) -> str:
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
    linears = linear_modules(model)
    adapted = {name for name, _ in adapter_modules(model)}
    arch = architecture(model)
    whole: set[str] = set()
    sliced: dict[str, set[str]] = {}
    for item in items:
        if item in ROLES:
            if arch is None:
                raise PeftlabError(
                    f"target role '{item}' is defined for GPT-2 and Llama-family models only; this model is neither. "
                    f"Fix: name the modules instead (a name, a dotted suffix or a regex). Linear layers: "
                    f"{candidates(linears)}"
                )
            roles = ("q", "k", "v", "o", "mlp") if item == "all-linear" else (item,)
            found = False
            for role in roles:
                for suffix, slice_name in ROLE_MAPS[arch][role]:
                    already = [name for name in adapted if has_suffix(name, suffix)]
                    if already:
                        raise PeftlabError(
                            f"target '{item}' maps onto layers that already have an adapter: "
                            f"{candidates(already)}. Fix: give all targets in one apply_adapters call"
                        )
                    for name in linears:
                        if has_suffix(name, suffix):
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
            matched = [name for name in linears if has_suffix(name, item)]
            non_linear = [
                name for name, module in model.named_modules()
                if has_suffix(name, item) and name not in linears and name not in adapted
                and not isinstance(module, AdapterModule)
            ]
            if non_linear and not matched:
                raise PeftlabError(
                    f"target '{item}' names module(s) that are not linear layers: {candidates(non_linear)}. "
                    f"Linear layers: {candidates(linears)}"
                )
        already = [name for name in adapted if (pattern.fullmatch(name) if is_regex else has_suffix(name, item))]
        if already:
            raise PeftlabError(f"target '{item}' matches layers that already have an adapter: {candidates(already)}")
        if not matched:  # every item must count: a typo beside a valid target would otherwise be dropped silently
            raise _matched_nothing(item, linears)
        whole.update(matched)

    specs = []
    for name in [name for name in linears if name in whole or name in sliced]:  # in the model's order
        slice_names = sliced.get(name, set())
        layout = next((FUSED_SLICES[suffix] for suffix in FUSED_SLICES if has_suffix(name, suffix)), ())
        if name in whole or set(layout) <= slice_names:
            specs.append(AdapterSpec(name))  # q, k and v together: one LoRA on the whole fused layer
        else:
            specs.append(AdapterSpec(name, tuple(s for s in layout if s in slice_names)))
    return specs


def _matched_nothing(item: str, linears: dict[str, nn.Linear]) -> PeftlabError:
    return PeftlabError(f"target '{item}' matched no linear layer of this model. Roles: {', '.join(ROLES)}; or module "
                        f"names / regexes among: {candidates(linears)}")


def slice_rows(name: str, linear: nn.Linear, slice_names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    layout = next(FUSED_SLICES[suffix] for suffix in FUSED_SLICES if has_suffix(name, suffix))
    if linear.out_features % len(layout):
        raise PeftlabError(f"{name}: {linear.out_features} output rows do not split into {len(layout)} equal slices")
    size = linear.out_features // len(layout)
    return {slice_name: (layout.index(slice_name) * size, (layout.index(slice_name) + 1) * size) for slice_name in slice_names}


def splice_rows(outside: torch.Tensor, slices: Mapping[str, tuple[int, int]], values: Mapping) -> torch.Tensor:
    """`outside` (rows,) with rows start:end of every slice replaced by `values[name]`; gradients reach the values.
    A fused layer's per-slice vectors (IA3 scales, DoRA magnitudes) as one vector over all its rows."""
    parts, position = [], 0
    for name, (start, end) in sorted(slices.items(), key=lambda item: item[1][0]):
        parts += [outside[position:start].to(values[name].dtype), values[name]]
        position = end
    return torch.cat(parts + [outside[position:].to(parts[-1].dtype)])


