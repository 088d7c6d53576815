"""Adapter-only checkpoints: round trip, refusals with clear messages, safetensors only."""

from __future__ import annotations

import json

import pytest
import torch

from peftlab.errors import PeftlabError
from peftlab.peft import (
    adapter_state_dict,
    apply_adapters,
    apply_method,
    load_adapter,
    lora_layers,
    merge_adapters,
    read_adapter_config,
    save_adapter,
)
from peftlab.peft.checkpoint import CONFIG_FILE, TENSORS_FILE

from lora_helpers import converted, randomize_adapters, randomize_parameters, tiny_classifier, tiny_gpt2_hf

ATOL = 1e-5


def _trained_classifier(hf):
    model = tiny_classifier(hf)
    apply_method(model, {"method": "lora", "targets": ["q", "v", "mlp"], "rank": 2, "alpha": 8, "dropout": 0.1,
                         "extra_trainable": ["head", "norms"]})
    randomize_adapters(model)
    randomize_parameters([p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n])
    return model.eval()


def test_round_trip_onto_a_fresh_base_model(tmp_path, tokens):
    hf = tiny_gpt2_hf()
    model = _trained_classifier(hf)
    expected = model(**tokens)
    save_adapter(model, tmp_path, base_model="tiny-gpt2", metadata={"method": "lora"})
    assert sorted(path.name for path in tmp_path.iterdir()) == [CONFIG_FILE, TENSORS_FILE]
    config = read_adapter_config(tmp_path)
    assert config["base_model"] == "tiny-gpt2" and config["metadata"] == {"method": "lora"}
    assert config["method"] == "lora" and config["format_version"] == 2
    assert config["adapters"][0] == {"module": "backbone.h.0.attn.c_attn", "kind": "lora", "slices": ["q", "v"],
                                     "rank": 2, "alpha": 8.0, "dropout": 0.1}
    # Only the fine-tuned tensors are saved: LoRA A/B, head, norms; never a frozen base weight.
    assert set(config["shapes"]) == set(adapter_state_dict(model))
    assert "score.weight" in config["shapes"] and "backbone.h.0.ln_1.bias" in config["shapes"]
    assert not any(name.endswith("c_fc.weight") or name.endswith("wte.weight") for name in config["shapes"])

    fresh = tiny_classifier(hf)
    assert not torch.allclose(fresh(**tokens), expected, atol=1e-3)
    load_adapter(fresh, tmp_path, base_model="tiny-gpt2")
    torch.testing.assert_close(fresh(**tokens), expected, atol=ATOL, rtol=0)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_loading_into_a_model_that_already_has_the_adapters_even_merged(tmp_path, tokens):
    hf = tiny_gpt2_hf()
    model = _trained_classifier(hf)
    expected = model(**tokens)
    save_adapter(model, tmp_path, base_model="tiny-gpt2")
    target = tiny_classifier(hf)
    apply_method(target, {"method": "lora", "targets": ["q", "v", "mlp"], "rank": 2, "alpha": 8})
    merge_adapters(target)
    assert all(layer.merged for _, layer in lora_layers(target))
    load_adapter(target, tmp_path, base_model="tiny-gpt2")
    torch.testing.assert_close(target(**tokens), expected, atol=ATOL, rtol=0)


def test_refuses_another_base_model_other_shapes_other_layers(tmp_path):
    hf = tiny_gpt2_hf()
    save_adapter(_trained_classifier(hf), tmp_path, base_model="tiny-gpt2")
    with pytest.raises(PeftlabError, match="trained on base model 'tiny-gpt2', not 'gpt2'"):
        load_adapter(tiny_classifier(hf), tmp_path, base_model="gpt2")

    other_labels = tiny_classifier(hf, num_labels=5)
    before = {n: p.clone() for n, p in other_labels.state_dict().items()}
    with pytest.raises(PeftlabError, match=r"shape mismatch.*score.weight: saved \(3, 32\), model \(5, 32\)"):
        load_adapter(other_labels, tmp_path, base_model="tiny-gpt2")
    assert not list(lora_layers(other_labels))  # left as it came
    assert all(torch.equal(before[n], p) for n, p in other_labels.state_dict().items())

    language_model = converted(hf)
    with pytest.raises(PeftlabError, match="targets layers this model does not have"):
        load_adapter(language_model, tmp_path, base_model="tiny-gpt2")

    different = tiny_classifier(hf)
    apply_adapters(different, ["q"], rank=2, alpha=8)
    with pytest.raises(PeftlabError, match="adapter modules differ"):
        load_adapter(different, tmp_path, base_model="tiny-gpt2")


def test_bad_files_give_clear_errors(tmp_path):
    hf = tiny_gpt2_hf()
    with pytest.raises(PeftlabError, match="no peftlab adapter"):
        load_adapter(tiny_classifier(hf), tmp_path, base_model="tiny-gpt2")
    save_adapter(_trained_classifier(hf), tmp_path, base_model="tiny-gpt2")
    (tmp_path / TENSORS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(PeftlabError, match="cannot read"):
        load_adapter(tiny_classifier(hf), tmp_path, base_model="tiny-gpt2")
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["format_version"] = 99
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PeftlabError, match="version 99"):
        load_adapter(tiny_classifier(hf), tmp_path, base_model="tiny-gpt2")


def test_non_lora_methods_save_their_trained_tensors(tmp_path, tokens):
    hf = tiny_gpt2_hf()
    model = tiny_classifier(hf)
    apply_method(model, {"method": "bitfit", "extra_trainable": ["head"]})
    randomize_parameters([p for p in model.parameters() if p.requires_grad])
    save_adapter(model, tmp_path, base_model="tiny-gpt2")
    fresh = tiny_classifier(hf)
    load_adapter(fresh, tmp_path, base_model="tiny-gpt2")
    torch.testing.assert_close(fresh(**tokens), model(**tokens), atol=ATOL, rtol=0)
