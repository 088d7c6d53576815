"""Houlsby / Pfeiffer bottleneck adapters: identity at init, one adapter by hand, placement, counts, round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from peftlab.peft import adapter_modules, apply_method, disable_adapters, load_adapter, parameter_report, save_adapter
from peftlab.peft.bottleneck import BottleneckAdapter

from lora_helpers import converted, randomize_parameters, tiny_gpt2_hf, tiny_llama_hf


def logits(model, tokens):
    with torch.no_grad():
        return model(**tokens).logits


def test_one_adapter_by_hand():
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 6)
    adapter = BottleneckAdapter(copy.deepcopy(linear), size=3, nonlinearity="tanh")
    x = torch.randn(2, 4)
    torch.testing.assert_close(adapter(x), linear(x))  # W_up = 0, b_up = 0: the base layer
    randomize_parameters(list(adapter.up.parameters()), scale=0.5)
    a = linear(x)
    expected = a + torch.tanh(a @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
    torch.testing.assert_close(adapter(x), expected)
    assert sum(p.numel() for p in adapter.adapter_parameters()) == 2 * 3 * 6 + 6 + 3  # 2md + d + m


@pytest.mark.parametrize("family, placement, wrapped", [
    ("gpt2", "houlsby", {"attn.c_proj", "mlp.c_proj"}), ("gpt2", "pfeiffer", {"mlp.c_proj"}),
    ("llama", "houlsby", {"self_attn.o_proj", "mlp.down_proj"}), ("llama", "pfeiffer", {"mlp.down_proj"}),
])
def test_placement_identity_at_init_disable_and_round_trip(family, placement, wrapped, tokens, tmp_path):
    hf = tiny_gpt2_hf() if family == "gpt2" else tiny_llama_hf()
    model = converted(hf)
    base = logits(model, tokens)
    apply_method(model, {"method": "adapter", "adapter_size": 4, "adapter_placement": placement, "extra_trainable": []})
    names = [name for name, _ in adapter_modules(model)]
    assert {name.split(".", 3)[-1] for name in names} == wrapped and len(names) == 2 * len(wrapped)  # 2 blocks
    assert parameter_report(model).adapter == parameter_report(model).trainable == len(names) * (2 * 4 * 32 + 32 + 4)
    torch.testing.assert_close(logits(model, tokens), base)
    randomize_parameters([p for p in model.parameters() if p.requires_grad], scale=0.3)
    tuned = logits(model, tokens)
    assert not torch.allclose(tuned, base, atol=1e-3)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, tokens), base)
    save_adapter(model, tmp_path, base_model="tiny")
    fresh = converted(hf)
    assert load_adapter(fresh, tmp_path, base_model="tiny")["method"] == "adapter"
    torch.testing.assert_close(logits(fresh, tokens), tuned, atol=1e-5, rtol=0)
