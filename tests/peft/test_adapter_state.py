"""Adapter state is explicit: `eval()` / `train()` and `disable_adapters` never rewrite a weight; merged evaluation
happens only inside `merged(model)`; merges are computed in the weight's dtype promoted to at least fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.peft import (
    LoRALinear,
    adapter_modules,
    adapter_state_dict,
    apply_method,
    disable_adapters,
    lora_layers,
    merge_adapters,
    merged,
)
from peftlab.peft.dora import DoRALinear

from lora_helpers import converted, randomize_parameters, tiny_gpt2_hf, tiny_llama_hf

ATOL = 1e-5
SETTINGS = {"targets": ["q", "v", "mlp"], "rank": 2, "alpha": 8, "extra_trainable": []}


def _adapted(method: str, family=tiny_gpt2_hf) -> nn.Module:
    """A tiny random model with every adapter tensor moved off its initial value (LoRA/DoRA B != 0, IA3 l != 1)."""
    model = converted(family())
    apply_method(model, {"method": method, **SETTINGS})
    adapter = adapter_state_dict(model)
    randomize_parameters(adapter.values(), scale=0.3)
    assert all(torch.count_nonzero(tensor) == tensor.numel() for name, tensor in adapter.items() if "lora_b" in name)
    return model


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_bitwise_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    changed = [name for name, tensor in before.items() if not torch.equal(after[name], tensor)]
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"


@pytest.mark.parametrize(("method", "steps"), [("lora", 1000), ("dora", 100), ("ia3", 100)])
def test_alternating_policy_and_reference_passes_leave_every_weight_bitwise_unchanged(method, steps, tokens):
    """What a DPO step does: a policy pass (with gradients every tenth time), then a reference pass with adapters
    off. The mode flips every pass too: `eval()` / `train()` used to merge / un-merge, and each fp32 round trip
    moved W0 by up to an ulp."""
    model = _adapted(method)
    ids = tokens["input_ids"]
    before = _snapshot(model)
    first: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in range(steps):
        training = step % 2 == 0
        model.train(training)
        with torch.set_grad_enabled(step % 10 == 0):
            policy = model(ids).logits
            if policy.requires_grad:
                policy.float().square().mean().backward()  # gradients reach the adapters; no optimizer step
        with torch.no_grad(), disable_adapters(model):
            reference = model(ids).logits
        policy = policy.detach()
        expected = first.setdefault(training, (policy, reference))
        assert torch.equal(policy, expected[0]) and torch.equal(reference, expected[1]), f"step {step}"
    assert not torch.allclose(first[True][0], first[True][1], atol=1e-3)  # the adapter does change the output
    _assert_bitwise_equal(model, before)
    assert not any(getattr(module, "merged", False) for _, module in adapter_modules(model))


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_eval_is_unmerged_and_merged_is_asked_for_and_undone(method, tokens):
    model = _adapted(method)
    ids = tokens["input_ids"]
    before = _snapshot(model)
    mergeable = [module for _, module in adapter_modules(model)]
    model.eval()
    unmerged = model(ids).logits
    assert not any(module.merged for module in mergeable)
    _assert_bitwise_equal(model, before)
    with merged(model) as same:
        assert same is model and all(module.merged for module in mergeable)
        torch.testing.assert_close(model(ids).logits, unmerged, atol=ATOL, rtol=0)
        with merged(model):  # nested: the inner block merges nothing, so it un-merges nothing
            pass
        assert all(module.merged for module in mergeable)
        with pytest.raises(PeftlabError, match="is merged.*Fix: leave `merged"):
            with disable_adapters(model):
                pass
    assert not any(module.merged for module in mergeable)
    for name, tensor in model.state_dict().items():  # fp32 LoRA / IA3 subtract (divide) back: an ulp at most
        torch.testing.assert_close(tensor, before[name], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=ATOL, rtol=0)


def test_merged_leaves_modules_merged_before_it_merged(tokens):
    model = _adapted("lora")
    layers = [layer for _, layer in lora_layers(model)]
    layers[0].merge()
    with merged(model):
        assert all(layer.merged for layer in layers)
    assert layers[0].merged and not any(layer.merged for layer in layers[1:])


def test_a_merge_that_fails_midway_undoes_the_ones_it_did(tokens):
    model = _adapted("ia3")
    modules = [module for _, module in adapter_modules(model)]
    with torch.no_grad():
        modules[-1].ia3_l.zero_()  # IA3 refuses to merge a zero scale: it could not be divided back
    with pytest.raises(PeftlabError, match="zero entry"):
        with merged(model):
            pass
    assert not any(module.merged for module in modules)


def test_merge_inside_disable_adapters_is_refused():
    model = _adapted("lora")
    with disable_adapters(model), pytest.raises(PeftlabError, match="while adapters are disabled"):
        merge_adapters(model)


@pytest.mark.parametrize("layer_type", [LoRALinear, DoRALinear])
def test_merging_an_fp64_weight_is_computed_in_fp64(layer_type):
    """The merge (and DoRA's norm) in the weight's dtype promoted to at least fp32: an fp64 model merged agrees
    with itself unmerged to fp64 rounding, where an fp32 detour would leave errors of about 1e-7."""
    torch.manual_seed(0)
    layer = layer_type(nn.Linear(64, 48).double(), rank=4, alpha=8)
    with torch.no_grad():
        for parameter in layer.adapter_parameters():
            parameter.add_(torch.randn_like(parameter))
    assert layer.lora_a.dtype == torch.float64
    x = torch.randn(5, 64, dtype=torch.float64)
    unmerged = layer(x)
    with merged(layer):
        torch.testing.assert_close(layer(x), unmerged, atol=1e-12, rtol=0)


def test_llama_passes_alternate_without_touching_weights(tokens):
    model = _adapted("dora", tiny_llama_hf)
    before = _snapshot(model)
    for step in range(20):
        model.train(step % 2 == 0)
        with torch.no_grad(), disable_adapters(model):
            model(tokens["input_ids"])
        model(tokens["input_ids"])
    _assert_bitwise_equal(model, before)
