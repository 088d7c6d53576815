"""DoRA: identity at init, the decomposition by hand, merged == unmerged, parity with peft's LoraConfig(use_dora)."""

from __future__ import annotations

import copy

import pytest
import torch

from peftlab.peft import adapter_modules, apply_method, disable_adapters, load_adapter, merge_adapters, save_adapter
from peftlab.peft import unmerge_adapters
from peftlab.peft.dora import DoRALinear, FusedDoRALinear

from lora_helpers import converted, tiny_gpt2_hf, tiny_llama_hf

ATOL = 1e-5


def randomize_dora(model, seed: int = 5) -> None:
    """B != 0 and magnitudes away from ‖W0‖, so every part of the layer matters (fused slices too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_modules(model):
            for name, parameter in layer.named_parameters():
                if name.startswith("lora_"):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
                elif name.startswith("magnitude"):
                    parameter.mul_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))


def logits(model, tokens):
    with torch.no_grad():
        return model(**tokens).logits


def test_the_decomposition_by_hand():
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    layer = DoRALinear(copy.deepcopy(linear), rank=2, alpha=4).train()
    torch.testing.assert_close(layer.magnitude, linear.weight.norm(dim=1))  # m starts at ‖W0‖_c
    with torch.no_grad():
        layer.lora_b.copy_(torch.randn(3, 2))
        layer.magnitude.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(5, 4)
    direction = linear.weight + 2.0 * layer.lora_b @ layer.lora_a  # scaling = alpha / r = 2
    expected = (x @ direction.T) * (layer.magnitude / direction.norm(dim=1)) + linear.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    # the norm is a constant: the magnitude's gradient is (W' x)/‖V‖, B's gradient flows through V x only
    layer(x).sum().backward()
    torch.testing.assert_close(layer.magnitude.grad, (x @ direction.T / direction.norm(dim=1)).sum(0).detach(),
                               atol=1e-5, rtol=1e-5)
    row_scale = (layer.magnitude / direction.norm(dim=1)).detach()
    expected_b = 2.0 * row_scale[:, None] * (x @ layer.lora_a.T).sum(0)[None, :]  # with ‖V‖ held constant
    torch.testing.assert_close(layer.lora_b.grad, expected_b.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_identity_at_init_merged_equals_unmerged_disabled_is_base_and_round_trip(family, tokens, tmp_path):
    hf = tiny_gpt2_hf() if family == "gpt2" else tiny_llama_hf()
    model = converted(hf)
    base = logits(model, tokens)
    apply_method(model, {"method": "dora", "targets": ["all-linear"], "rank": 2, "alpha": 8, "extra_trainable": []})
    model.train()
    torch.testing.assert_close(logits(model, tokens), base, atol=ATOL, rtol=0)
    randomize_dora(model)
    unmerged = logits(model, tokens)
    assert not torch.allclose(unmerged, base, atol=1e-3)
    merge_adapters(model)
    merge_adapters(model)
    torch.testing.assert_close(logits(model, tokens), unmerged, atol=ATOL, rtol=0)
    unmerge_adapters(model)
    torch.testing.assert_close(logits(model, tokens), unmerged, atol=ATOL, rtol=0)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, tokens), base, atol=ATOL, rtol=0)
    save_adapter(model, tmp_path, base_model="tiny")
    fresh = converted(hf)
    assert load_adapter(fresh, tmp_path, base_model="tiny")["method"] == "dora"
    torch.testing.assert_close(logits(fresh.train(), tokens), unmerged, atol=ATOL, rtol=0)


def test_gpt2_q_v_slices_are_dora_on_separate_projections_and_leave_k_alone(tmp_path, tokens):
    from peft import PeftModel

    from peftlab.hf import export_peft

    hf = tiny_gpt2_hf()
    model = converted(hf)
    base = logits(model, tokens)
    apply_method(model, {"method": "dora", "targets": ["q", "v"], "rank": 2, "alpha": 4, "extra_trainable": []})
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, FusedDoRALinear) and list(layer.slices) == ["q", "v"]
    torch.testing.assert_close(logits(model, tokens), base)  # B = 0, m = ‖W0‖: the base model
    randomize_dora(model)
    model.train()
    x = torch.randn(5, 32)
    with torch.no_grad():
        fused = layer(x)
        torch.testing.assert_close(fused[:, 32:64], layer.base(x)[:, 32:64])  # k rows: exactly the base
        for name, (start, end) in layer.slices.items():  # q and v: DoRA on a projection of their own rows
            own = torch.nn.Linear(32, end - start)
            own.weight.copy_(layer.base.weight[start:end])
            own.bias.copy_(layer.base.bias[start:end])
            alone = DoRALinear(own, rank=2, alpha=4).train()
            alone.lora_a.copy_(layer.lora_a[name])
            alone.lora_b.copy_(layer.lora_b[name])
            alone.magnitude.copy_(layer.magnitude[name])
            torch.testing.assert_close(fused[:, start:end], alone(x), atol=ATOL, rtol=1e-5)
    unmerged = logits(model, tokens)
    model.eval()  # merges
    torch.testing.assert_close(logits(model, tokens), unmerged, atol=ATOL, rtol=0)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, tokens), base, atol=ATOL, rtol=0)
    save_adapter(model, tmp_path / "ours", base_model="tiny")
    fresh = converted(hf)
    load_adapter(fresh, tmp_path / "ours", base_model="tiny")
    torch.testing.assert_close(logits(fresh.eval(), tokens), unmerged, atol=ATOL, rtol=0)
    export_peft(model, tmp_path / "peft", "tiny")  # one whole-c_attn DoRA, ‖W0‖ magnitudes on the k rows
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs, tokens), unmerged, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_same_factors_same_logits_as_peft_dora(family, tokens):
    from peft import LoraConfig, get_peft_model

    hf = tiny_gpt2_hf() if family == "gpt2" else tiny_llama_hf()
    ours = converted(hf)
    targets = ["c_attn", "mlp.c_fc"] if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    apply_method(ours, {"method": "dora", "targets": targets, "rank": 2, "alpha": 8, "extra_trainable": []})
    randomize_dora(ours)
    theirs = get_peft_model(copy.deepcopy(hf), LoraConfig(r=2, lora_alpha=8, target_modules=targets, use_dora=True,
                                                          fan_in_fan_out=family == "gpt2", lora_dropout=0.0))
    layers = dict(adapter_modules(ours))
    copied = 0
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            for key, ours_name in ((".lora_A.", "lora_a"), (".lora_B.", "lora_b"), (".lora_magnitude_vector.", "magnitude")):
                if key in name:
                    module = name.removeprefix("base_model.model.").split(key)[0]
                    parameter.copy_(getattr(layers[module], ours_name).detach().view_as(parameter))
                    copied += 1
    assert copied == 3 * len(layers)
    torch.testing.assert_close(logits(theirs.eval(), tokens), logits(ours.eval(), tokens), atol=ATOL, rtol=1e-5)
