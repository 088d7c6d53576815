"""The real SmolLM2-135M (needs `make setup`): our LoRA, its peft export and its merged export agree."""

from __future__ import annotations

import copy

import pytest
import torch

from peftlab.hf import export_merged, export_peft
from peftlab.peft import apply_method, lora_layers, merge_adapters, parameter_report

from lora_helpers import randomize_adapters

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def smollm2():
    from peftlab.errors import PeftlabError
    from peftlab.models import load_model, smollm2_cache_path

    try:
        model, tokenizer = load_model("smollm2-135m")
    except PeftlabError as error:
        pytest.skip(f"smollm2-135m is not available here: {error}")
    return model, tokenizer, smollm2_cache_path()


def test_smollm2_lora_matches_peft_and_the_merged_export(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    base, tokenizer, cache = smollm2
    model = copy.deepcopy(base)
    adapted = apply_method(model, {"method": "lora", "targets": ["q", "v", "o", "mlp"], "rank": 8, "alpha": 16})
    assert len(adapted) == 30 * 6
    assert parameter_report(model).adapter == 30 * 8 * ((576 + 576) + (576 + 192) + (576 + 576) + 3 * (576 + 1536))
    randomize_adapters(model, scale=0.02)
    batch = tokenizer(["The capital of France is", "LoRA adds a low-rank update"], return_tensors="pt", padding=True)
    with torch.no_grad():
        model.train()
        unmerged = model(**batch).logits
        model.eval()
        merge_adapters(model)
        assert all(layer.merged for _, layer in lora_layers(model))
        merged_logits = model(**batch).logits
        export_peft(model, tmp_path / "peft", base_model_name_or_path=str(cache))
        peft_model = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32), tmp_path / "peft"
        ).eval()
        peft_logits = peft_model(**batch).logits
        export_merged(model, tmp_path / "merged", tokenizer=tokenizer)
        plain_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(**batch).logits
        base_logits = base(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (unmerged - base_logits)[mask].abs().max() > 1e-2  # the adapter does something
    for other in (merged_logits, peft_logits, plain_logits):
        torch.testing.assert_close(other[mask], unmerged[mask], atol=1e-4, rtol=1e-5)  # 30 layers, logits ~ 20: fp32 rounding
