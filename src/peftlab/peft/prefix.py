"""Prefix tuning (Li & Liang, 2021): p learned key/value vectors per layer that every token also attends to.

For every layer l the attention of a token over the sequence becomes attention over [P_l ; sequence], where
P_l = (K_l, V_l) holds p keys and p values per key-value head (grouped-query models such as SmolLM2 learn prefixes
for their 3 key-value heads, which all of a group's query heads share). Nothing else changes: the prefix is
placed in the model's KV cache before the first token, the attention mask gets p leading ones and the tokens'
positions start at p, exactly as a cache of p earlier tokens would. Attention over the prefix and the content is
one softmax, so the prefix rescales all content weights of a query by the same factor: the ratio of the weights
of two content tokens is what the base model gives. Prefix keys carry no rotary position (they are keys as
stored in the cache); on GPT-2 positions p, p+1, ... are absolute positions, as in Hugging Face peft.

Parameters: layers · 2 · key-value heads · head size · p (SmolLM2-135M: 30 · 2 · 3 · 64 = 11,520 per prefix
position). `prefix_projection` H trains them through an MLP instead (the paper's reparameterisation, which
trains more stably): an embedding (p, kv width) → Linear(kv width, H) → tanh → Linear(H, layers · 2 · kv width),
peft's shapes (kv width = key-value heads · head size); the prefix it produces is what the model uses, and what an
export to peft holds as plain prefixes.

Initialisation: plain prefixes start as the keys and values the base model itself computes for p random vocabulary
tokens (Li & Liang found real-word activations train better than random vectors); the projection's embedding
starts N(0, 1), as peft's. The module lives in the transformer body (`<body>.prefix_tuning`) and acts through a
forward pre-hook on the body, so the engine, tasks and generation need no case of their own. Not mergeable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from peftlab.errors import PeftlabError
from peftlab.models import model_positions, position_limit
from peftlab.peft.base import AdapterMethod, AdapterModule, PeftExport, adapter_modules

MODULE_NAME = "prefix_tuning"  # the attribute of the transformer body that holds the prefix
INIT_SEED = 0  # the random vocabulary tokens whose keys and values start the prefix


def transformer_body(model: nn.Module) -> PreTrainedModel:
    """The model's transformer body (LlamaModel, GPT2Model): the module that takes the KV cache."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.base_model is module:
            return module
    raise PeftlabError("prefix tuning needs a Hugging Face transformer (GPT-2 or Llama family) inside the model")


def check_prefix_fits(length: int, max_length: int, positions: int | None, model: str) -> None:
    """Refuse a prefix that leaves the model too few positions for --max-length tokens: every token's position
    comes after the p prefix positions, so p + max length must be at most the model's positions. A max length
    beyond the model's positions is not a length it could take with any method (peftlab accepts it, e.g. a task's
    default on a small model, and the model's positions are the real bound): then only the tokens that actually
    come are checked, by the prefix's hook (`PrefixTuning._before_body`)."""
    if positions is None or max_length > positions or length + max_length <= positions:
        return
    fixes = [f"--prefix-length at most {positions - max_length}" if positions - max_length >= 1 else "",
             f"--max-length at most {positions - length}" if positions - length >= 1 else ""]
    fixes = [fix for fix in fixes if fix] or [f"a --prefix-length and --max-length that add up to at most {positions}"]
    raise PeftlabError(f"--prefix-length {length} + --max-length {max_length} = {length + max_length} positions, but "
                       f"{model} has {positions} (each token's position comes after the prefix's). Fix: "
                       f"{', or '.join(fixes)}")


def body_shape(config) -> tuple[int, int, int]:
    """(layers, key-value heads, head size) of a transformer config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_size


class PrefixTuning(AdapterModule):
    """The prefixes of every layer of one transformer body, and the hook that puts them in front of its input."""

    method = "prefix"

    def __init__(self, body: PreTrainedModel, length: int, projection: int | None = None):
        super().__init__()
        if length < 1:
            raise PeftlabError(f"--prefix-length must be >= 1, got {length}")
        if projection is not None and projection < 1:
            raise PeftlabError(f"--prefix-projection must be >= 1 (or left out for plain prefixes), got {projection}")
        self.length, self.projection = length, projection
        self.layers, self.kv_heads, self.head_size = body_shape(body.config)
        self.positions = position_limit(body.config)
        if self.positions is not None and length >= self.positions:
            raise PeftlabError(f"--prefix-length {length} leaves no position for a token: the model has "
                               f"{self.positions} positions. Fix: a --prefix-length and --max-length that add up to "
                               f"at most {self.positions}")
        width = self.layers * 2 * self.kv_heads * self.head_size  # every layer's keys and values of one position
        device = body.get_input_embeddings().weight.device
        if projection is None:
            self.prefix = nn.Parameter(torch.zeros(length, width, device=device))  # (p, L·2·kv_heads·head_size)
            self._initialise(body)
        else:  # peft's shapes: an embedding as wide as one layer's keys
            kv_width = self.kv_heads * self.head_size
            self.embedding = nn.Parameter(torch.randn(length, kv_width, device=device))
            self.mlp = nn.Sequential(nn.Linear(kv_width, projection), nn.Tanh(), nn.Linear(projection, width)).to(device)
        self._hook = body.register_forward_pre_hook(self._before_body, with_kwargs=True)

    @torch.no_grad()
    def _initialise(self, body: PreTrainedModel) -> None:
        generator = torch.Generator().manual_seed(INIT_SEED)
        tokens = torch.randint(body.config.vocab_size, (1, self.length), generator=generator)
        tokens = tokens.to(body.get_input_embeddings().weight.device)
        was_training = body.training
        body.eval()  # the base model's own keys and values of the tokens, without dropout
        cache = body(input_ids=tokens, use_cache=True).cache
        body.train(was_training)
        states = torch.stack([torch.stack([cache.layers[layer].keys[0], cache.layers[layer].values[0]])
                              for layer in range(self.layers)])  # (L, 2, kv_heads, p, head_size)
        self.prefix.copy_(states.permute(3, 0, 1, 2, 4).reshape(self.length, -1).float())

    def prefix_states(self) -> torch.Tensor:
        """The prefix as (layers, 2 [keys, values], kv_heads, p, head_size)."""
        flat = self.prefix if self.projection is None else self.mlp(self.embedding)  # (p, L·2·kv_heads·head_size)
        return flat.view(self.length, self.layers, 2, self.kv_heads, self.head_size).permute(1, 2, 3, 0, 4)

    def _before_body(self, body: nn.Module, args: tuple, kwargs: dict):
        """Start an empty cache with the prefix, let every query see it in the mask and shift positions by p."""
        if self.disabled:
            return None
        if len(args) > 1:
            raise PeftlabError("prefix tuning: call the transformer body with keyword arguments after input_ids")
        inputs = args[0] if args else kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        batch = inputs.shape[0]
        cache = kwargs.get("cache")
        if cache is None or cache.get_seq_length() == 0:  # a non-empty cache already starts with the prefix
            cache = cache if cache is not None else DynamicCache(config=body.config)
            dtype = body.get_input_embeddings().weight.dtype
            states = self.prefix_states().to(dtype)
            for layer in range(self.layers):
                keys, values = (states[layer, kind][None].expand(batch, -1, -1, -1) for kind in (0, 1))
                cache.update(keys, values, layer)
            kwargs["cache"] = cache
        used = cache.get_seq_length() + inputs.shape[1]  # the prefix, earlier tokens and these
        if self.positions is not None and used > self.positions:
            raise PeftlabError(f"prefix tuning: {self.length} prefix positions + {used - self.length} tokens = {used} "
                               f"positions, but the model has {self.positions}. Fix: shorter inputs (--max-length, "
                               "or a shorter prompt / --max-new-tokens) or a shorter --prefix-length")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim not in (2, 4):
            raise PeftlabError(f"prefix tuning needs a (batch, tokens) or (batch, 1, queries, keys) attention mask, "
                               f"got shape {tuple(mask.shape)}")
        if mask is not None:  # every query sees the prefix: ones (bool/int) or 0 (an additive mask) in front
            seen = mask.new_ones(()) if mask.dtype in (torch.bool, torch.long, torch.int) else mask.new_zeros(())
            kwargs["attention_mask"] = torch.cat([seen.expand(*mask.shape[:-1], self.length), mask], dim=-1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.length
        return args, kwargs

    def remove_from(self, model: nn.Module, name: str) -> None:
        self._hook.remove()
        super().remove_from(model, name)

    def spec(self) -> dict:
        return {"length": self.length, "projection": self.projection}

    def extra_repr(self) -> str:
        return f"length={self.length}, projection={self.projection}, layers={self.layers}, kv_heads={self.kv_heads}"


def prefix_module_name(model: nn.Module) -> str:
    body = transformer_body(model)
    body_name = next(name for name, module in model.named_modules() if module is body)
    return f"{body_name}.{MODULE_NAME}" if body_name else MODULE_NAME


def apply_prefix(model: nn.Module, length: int, projection: int | None) -> str:
    body = transformer_body(model)
    if hasattr(body, MODULE_NAME):
        raise PeftlabError("the model already has a prefix; prefix tuning is applied once")
    setattr(body, MODULE_NAME, PrefixTuning(body, length, projection))
    return prefix_module_name(model)


@dataclass
class PrefixSettings:
    """Prefix tuning's settings; the field names are the adapter section's (--prefix-length, ...)."""

    prefix_length: int = 10  # p, prefix positions per layer
    prefix_projection: int | None = None  # the MLP width H; None = plain prefixes


class PrefixMethod(AdapterMethod):
    """Prefix tuning (`prefix_length`, `prefix_projection`): only the prefix (or its MLP) trains."""

    name = "prefix"
    settings_type = PrefixSettings
    module_type = PrefixTuning
    adds_modules = True
    peft_type = "PREFIX_TUNING"

    def check_fits(self, settings: PrefixSettings, model: str, max_length: int) -> None:
        check_prefix_fits(settings.prefix_length, max_length, model_positions(model), model)

    def describe(self, settings: PrefixSettings) -> str:
        projection = f" H{settings.prefix_projection}" if settings.prefix_projection else ""
        return f"{self.name} p{settings.prefix_length}{projection}"

    def inject(self, model: nn.Module, settings: PrefixSettings) -> list[str]:
        return [apply_prefix(model, settings.prefix_length, settings.prefix_projection)]

    def rebuild(self, model: nn.Module, specs: Sequence[dict]) -> None:
        place = prefix_module_name(model)
        for item in specs:
            if item["module"] != place:
                raise PeftlabError(f"the checkpoint's prefix sits at {item['module']}, this model's would sit at "
                                   f"{place}: is it the same base model and task?")
            apply_prefix(model, item["length"], item["projection"])

    def peft_export(self, model: nn.Module, hf_name: Callable[[str], str]) -> PeftExport:
        """The prefix as peft's `prompt_embeddings` (p, layers · 2 · kv width), plain even when it was trained
        through a projection (peft, too, saves what the projection produces); no module names, so no `hf_name`."""
        (_, prefix), = adapter_modules(model)
        states = prefix.prefix_states().detach()  # (L, 2, kv_heads, p, head_size)
        embeddings = states.permute(3, 0, 1, 2, 4).reshape(prefix.length, -1)  # (p, L·2·kv_heads·head_size)
        kv_width = prefix.kv_heads * prefix.head_size
        config = {"peft_type": self.peft_type, "num_virtual_tokens": prefix.length, "token_dim": kv_width,
                  "num_transformer_submodules": 1, "num_attention_heads": prefix.kv_heads, "num_layers": prefix.layers,
                  "encoder_hidden_size": kv_width, "prefix_projection": False}
        return PeftExport(config, {"prompt_embeddings": embeddings}, {id(p) for p in prefix.adapter_parameters()})
