"""Parity with Hugging Face peft and transformers: same A/B => same logits; exports load and agree.

peft's base model is always the *unconverted* Hugging Face model (GPT-2 with Conv1D layers).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from peftlab.errors import PeftlabError
from peftlab.hf import export_merged, export_peft
from peftlab.peft import (
    apply_adapters,
    adapter_modules,
    apply_method,
    load_adapter,
    lora_layers,
    merge_adapters,
    merge_and_strip,
    save_adapter,
)

from lora_helpers import (
    converted,
    randomize_adapters,
    randomize_parameters,
    tiny_classifier,
    tiny_gpt2_hf,
    tiny_llama_hf,
)

peft = pytest.importorskip("peft")
ATOL = 1e-5
BUILDERS = {"gpt2": tiny_gpt2_hf, "llama": tiny_llama_hf}


def _close(actual, expected):
    torch.testing.assert_close(actual.detach(), expected.detach(), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("arch", "targets", "extra"),
    [
        ("gpt2", ["q", "v", "o", "mlp"], ["norms", "biases"]),  # q/v slices of the fused c_attn
        ("gpt2", ["all-linear"], []),
        ("llama", ["q", "v", "o", "mlp"], ["norms"]),
    ],
)
def test_every_form_of_the_model_gives_the_same_logits(arch, targets, extra, tmp_path, tokens):
    """unmerged == merged == merged-and-stripped == saved-and-reloaded == peft-loaded export == merged export."""
    from transformers import AutoModelForCausalLM

    hf = BUILDERS[arch]()
    model = converted(hf)
    apply_method(model, {"method": "lora", "targets": targets, "rank": 2, "alpha": 6, "extra_trainable": extra})
    randomize_adapters(model)  # B != 0: a merge test with B = 0 proves nothing
    randomize_parameters([p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n])
    ids = tokens["input_ids"]
    base_logits = hf(ids).logits

    model.train()
    unmerged = model(ids).logits
    assert not torch.allclose(unmerged, base_logits, atol=1e-3)
    model.eval()
    merge_adapters(model)
    assert all(layer.merged for _, layer in lora_layers(model))
    _close(model(ids).logits, unmerged)
    _close(merge_and_strip(copy.deepcopy(model))(ids).logits, unmerged)

    save_adapter(model, tmp_path / "ours", base_model="tiny")
    reloaded = converted(hf)
    load_adapter(reloaded, tmp_path / "ours", base_model="tiny")
    _close(reloaded.eval()(ids).logits, unmerged)

    export_peft(model, tmp_path / "peft", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "peft").eval()
    _close(peft_model(ids).logits, unmerged)
    _close(peft_model.merge_and_unload()(ids).logits, unmerged)  # peft's merge uses fan_in_fan_out for Conv1D

    export_merged(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    _close(plain(ids).logits, unmerged)
    if arch == "gpt2":
        assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert all(layer.merged for _, layer in lora_layers(model))  # exporting left our model as it was


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_same_lora_weights_same_forward_as_peft(arch, tokens):
    """peft's own get_peft_model, its A/B copied into ours: forward passes agree (no export involved)."""
    hf = BUILDERS[arch]()
    names = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "down_proj"]}[arch]
    lora_config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=names, fan_in_fan_out=arch == "gpt2",
                                  init_lora_weights=False)  # random A and B
    peft_model = peft.get_peft_model(copy.deepcopy(hf), lora_config).eval()
    ours = converted(hf)
    apply_adapters(ours, names, rank=4, alpha=12)
    peft_layers = {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
                   if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert set(peft_layers) == {name for name, _ in lora_layers(ours)}
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            layer.lora_a.copy_(peft_layers[name].lora_A["default"].weight)
            layer.lora_b.copy_(peft_layers[name].lora_B["default"].weight)
    ours.train()
    expected = peft_model(tokens["input_ids"]).logits
    assert not torch.allclose(expected, hf(tokens["input_ids"]).logits, atol=1e-3)
    _close(ours(tokens["input_ids"]).logits, expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_classifier_exports_load_as_sequence_classification_models(arch, tmp_path, tokens):
    from transformers import AutoModelForSequenceClassification

    hf = BUILDERS[arch]()
    model = tiny_classifier(hf, num_labels=3)
    apply_method(model, {"method": "lora", "targets": ["q", "v"], "rank": 2, "alpha": 4,
                         "extra_trainable": ["head", "norms"]})
    randomize_adapters(model)
    randomize_parameters([p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n])
    expected = model(**tokens)

    export_merged(model, tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    _close(plain(**tokens).logits, expected)

    export_peft(model, tmp_path / "peft", base_model_name_or_path="tiny")
    config = copy.deepcopy(hf.config)
    config.num_labels = 3
    base = AutoModelForSequenceClassification.from_config(config)
    getattr(base, base.base_model_prefix).load_state_dict(hf.base_model.state_dict())  # same body, random head
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    _close(peft_model(**tokens).logits, expected)


def test_export_peft_needs_lora_layers(tmp_path):
    model = converted(tiny_gpt2_hf())
    apply_method(model, {"method": "bitfit"})
    with pytest.raises(PeftlabError, match="export_merged"):
        export_peft(model, tmp_path, "tiny")


def _randomize_method(model, method: str) -> None:
    """Non-trivial values for every adapter tensor of any method (IA3 scales around one, never zero)."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, module in adapter_modules(model):
            for parameter in module.adapter_parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(1 + 0.5 * noise if method == "ia3" else parameter + 0.3 * noise)


METHOD_SETTINGS = {
    "ia3": {"targets": ["k", "v", "down"]},  # GPT-2: k/v slices of c_attn -> one c_attn vector, ones on q
    "dora": {"targets": ["all-linear"], "rank": 2, "alpha": 6},
    "prefix": {"prefix_length": 4},
    "prefix-projection": {"prefix_length": 4, "prefix_projection": 8},  # exported as the plain prefix it produces
}


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_exportable_method_loads_in_peft_with_the_same_logits(arch, method, tmp_path):
    hf = BUILDERS[arch]()
    model = converted(hf)
    apply_method(model, {"method": method.split("-")[0], "extra_trainable": [], **METHOD_SETTINGS[method]})
    _randomize_method(model, method.split("-")[0])
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(expected, hf(ids).logits, atol=1e-3)
    export_peft(model, tmp_path / "peft", base_model_name_or_path="tiny")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "peft").eval()
    with torch.no_grad():
        _close(peft_model(input_ids=ids, attention_mask=mask).logits, expected)


def test_methods_peft_lacks_are_refused_with_the_alternative(tmp_path):
    model = converted(tiny_gpt2_hf())
    apply_method(model, {"method": "adapter", "adapter_size": 4})
    with pytest.raises(PeftlabError, match="adapter modules \\(peft has no such method\\)"):
        export_peft(model, tmp_path / "out", "tiny")
    assert not (tmp_path / "out").exists()
