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
    apply_method,
    load_adapter,
    lora_layers,
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
    apply_method(model, "lora", targets=targets, rank=2, alpha=6, extra_trainable=extra)
    randomize_adapters(model)  # B != 0: a merge test with B = 0 proves nothing
    randomize_parameters([p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n])
    ids = tokens["input_ids"]
    base_logits = hf(ids).logits

    model.train()
    unmerged = model(ids).logits
    assert not torch.allclose(unmerged, base_logits, atol=1e-3)
    model.eval()
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
    apply_method(model, "lora", targets=["q", "v"], rank=2, alpha=4, extra_trainable=["head", "norms"])
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
    apply_method(model, "bitfit")
    with pytest.raises(PeftlabError, match="export_merged"):
        export_peft(model, tmp_path, "tiny")
