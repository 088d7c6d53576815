"""Training touches only what mark_trainable selected; the adapter-disabled model stays the base model."""

from __future__ import annotations

import pytest
import torch

from peftlab.peft import apply_method, disable_adapters
from peftlab.peft.prepare import canonical_parameter_names

from lora_helpers import converted, tiny_classifier, tiny_gpt2_hf, tiny_llama_hf


@pytest.mark.parametrize(
    ("arch", "method", "extra"),
    [("gpt2", "lora", ["head", "norms"]), ("llama", "lora", ["head"]), ("gpt2", "bitfit", ["head"])],
)
def test_only_trainable_tensors_change(arch, method, extra, tokens):
    hf = {"gpt2": tiny_gpt2_hf, "llama": tiny_llama_hf}[arch]()
    model = tiny_classifier(hf)
    apply_method(model, {"method": method, "targets": ["q", "v", "mlp"], "rank": 2, "alpha": 4,
                         "extra_trainable": extra})
    before = {name: p.detach().clone() for name, p in canonical_parameter_names(model).items()}
    trainable = {name for name, p in canonical_parameter_names(model).items() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    labels = torch.tensor([0, 1, 2])
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(**tokens), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = canonical_parameter_names(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == trainable  # every trainable tensor moved (lora_b too), nothing else did, not even by rounding

    model.eval()  # merges: the frozen base weights now hold W0 + scaling · B A
    model.train()  # un-merges: back to the original frozen weights
    for name in before:
        if name not in trainable:
            torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=0)


def test_disabled_model_serves_as_its_own_reference(tokens):
    """The DPO use: one model, adapter on = policy, adapter off = frozen reference."""
    hf = tiny_gpt2_hf()
    reference = converted(hf)
    model = converted(hf)
    apply_method(model, {"method": "lora", "targets": ["all-linear"], "rank": 2, "alpha": 4})
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        logits = model(tokens["input_ids"]).logits
        loss = logits.logsumexp(-1).mean() - logits[..., 5].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad(), disable_adapters(model):
            torch.testing.assert_close(model(tokens["input_ids"]).logits, reference(tokens["input_ids"]).logits,
                                       atol=1e-5, rtol=0)
    assert not torch.allclose(model(tokens["input_ids"]).logits, reference(tokens["input_ids"]).logits, atol=1e-3)
