"""The adapter-method protocol: a method defined outside peftlab (one class + one registry entry) gets injection,
trainability, parameter reports, checkpoints, merging and disabling without any other change; checkpoints written
before methods were plug-ins (format version 1) still load."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.peft import (
    METHODS,
    AdapterMethod,
    AdapterModule,
    apply_method,
    disable_adapters,
    load_adapter,
    merge_and_strip,
    parameter_report,
    resolve_targets,
    save_adapter,
)
from peftlab.peft.checkpoint import CONFIG_FILE

from lora_helpers import randomize_adapters, randomize_parameters, tiny_classifier, tiny_gpt2_hf, tiny_llama_hf

ATOL = 1e-5


class OutputScale(AdapterModule):
    """y = g ⊙ (W x + b) with a learned vector g (ones at init): small, mergeable, like IA3 on outputs."""

    method = "output-scale"
    mergeable = True

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.gain = nn.Parameter(torch.ones(base.out_features))
        self.merged = False

    def forward(self, x):
        out = self.base(x)
        return out if self.merged or self.disabled else out * self.gain

    def spec(self) -> dict:
        return {}

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self._gain = self.gain.detach().clone()
            self.base.weight.mul_(self._gain[:, None])
            if self.base.bias is not None:
                self.base.bias.mul_(self._gain)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight.div_(self._gain[:, None])
            if self.base.bias is not None:
                self.base.bias.div_(self._gain)
            self.merged = False


class OutputScaleMethod(AdapterMethod):
    name = "output-scale"
    mergeable = True

    def inject(self, model, settings):
        specs = resolve_targets(model, settings.targets)
        self.rebuild(model, [{"module": spec.module} for spec in specs])
        return [spec.module for spec in specs]

    def trainable_parameters(self, model):
        return [module.gain for module in model.modules() if isinstance(module, OutputScale)]

    def rebuild(self, model, specs):
        for item in specs:
            parent, _, child = item["module"].rpartition(".")
            setattr(model.get_submodule(parent), child, OutputScale(model.get_submodule(item["module"])))


@pytest.fixture
def output_scale(monkeypatch):
    monkeypatch.setitem(METHODS, "output-scale", OutputScaleMethod())


def test_a_new_method_needs_only_its_class_and_a_registry_entry(output_scale, tmp_path, tokens):
    hf = tiny_gpt2_hf()
    model = tiny_classifier(hf)
    base_logits = model(**tokens)
    adapted = apply_method(model, "output-scale", targets=["mlp"], extra_trainable=["head"])
    assert adapted == [f"backbone.h.{i}.mlp.{name}" for i in (0, 1) for name in ("c_fc", "c_proj")]
    torch.testing.assert_close(model(**tokens), base_logits)  # gains start at one: the base model
    report = parameter_report(model)
    assert report.adapter == 2 * (4 * 32 + 32)  # per block: c_fc (4d outputs) + c_proj (d), d = 32
    assert report.trainable == report.adapter + sum(p.numel() for p in model.score.parameters())
    randomize_parameters([p for p in model.parameters() if p.requires_grad], scale=0.3)
    expected = model(**tokens)
    with disable_adapters(model):  # the gains are off; the trained head stays
        head_only = model(**tokens)
    assert not torch.allclose(head_only, expected)

    save_adapter(model, tmp_path, base_model="tiny-gpt2")
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["method"] == "output-scale" and config["adapters"][0] == {"module": "backbone.h.0.mlp.c_fc",
                                                                           "kind": "output-scale"}
    fresh = tiny_classifier(hf)
    load_adapter(fresh, tmp_path, base_model="tiny-gpt2")
    torch.testing.assert_close(fresh(**tokens), expected, atol=ATOL, rtol=0)
    assert [name for name, p in fresh.named_parameters() if p.requires_grad] == \
           [name for name, p in model.named_parameters() if p.requires_grad]
    torch.testing.assert_close(merge_and_strip(fresh)(**tokens), expected, atol=ATOL, rtol=0)
    assert not any(isinstance(module, OutputScale) for module in fresh.modules())


def test_a_format_1_checkpoint_still_loads(tmp_path, tokens):
    """What peftlab wrote before methods were plug-ins: no method, no kind, format_version 1."""
    hf = tiny_gpt2_hf()
    model = tiny_classifier(hf)
    apply_method(model, "lora", targets=["q", "v"], rank=2, alpha=8, extra_trainable=["head"])
    randomize_adapters(model)
    expected = model.eval()(**tokens)
    save_adapter(model, tmp_path, base_model="tiny-gpt2")
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["format_version"] = 1
    del config["method"]
    for item in config["adapters"]:
        del item["kind"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    fresh = tiny_classifier(hf)
    loaded = load_adapter(fresh, tmp_path, base_model="tiny-gpt2")
    assert loaded["method"] == "lora"
    torch.testing.assert_close(fresh.eval()(**tokens), expected, atol=ATOL, rtol=0)


def test_bitfit_on_a_model_without_biases_says_what_to_use_instead():
    llama = tiny_llama_hf()  # Llama linears and RMSNorms have no bias, like SmolLM2
    with pytest.raises(PeftlabError, match="has none.*Fix: use --method lora"):
        apply_method(llama, "bitfit", extra_trainable=[])
    with pytest.raises(PeftlabError, match="unknown method .bitfti.: expected one of lora, full, bitfit, head, ia3, dora, adapter"):
        apply_method(llama, "bitfti")
