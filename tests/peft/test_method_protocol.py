"""The adapter-method protocol: a method defined outside peftlab (one class + one registry entry) gets its settings,
injection, trainability, parameter reports, its report description, checkpoints, merging and disabling without
any other change; a run's adapter section is what `apply_method` takes; checkpoints written before methods were
plug-ins (format version 1) still load."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.peft import (
    METHODS,
    AdapterMethod,
    AdapterModule,
    LoRASettings,
    PrefixSettings,
    apply_method,
    disable_adapters,
    get_method,
    load_adapter,
    merge_and_strip,
    method_for,
    parameter_report,
    resolve_targets,
    save_adapter,
)
from peftlab.peft.checkpoint import CONFIG_FILE
from peftlab.report.tables import method_settings

from lora_helpers import (
    converted,
    randomize_adapters,
    randomize_parameters,
    tiny_classifier,
    tiny_gpt2_hf,
    tiny_llama_hf,
)

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


@dataclass
class OutputScaleSettings:
    """The method's own settings, read by name from the adapter section like any method's."""

    targets: tuple[str, ...] = ("all-linear",)


class OutputScaleMethod(AdapterMethod):
    name = "output-scale"
    settings_type = OutputScaleSettings
    mergeable = True

    def describe(self, settings):
        return f"output-scale on {'+'.join(settings.targets)}"

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
    adapted = apply_method(model, {"method": "output-scale", "targets": ["mlp"], "extra_trainable": ["head"]})
    assert adapted == [f"backbone.h.{i}.mlp.{name}" for i in (0, 1) for name in ("c_fc", "c_proj")]
    assert method_settings({"method": "output-scale", "targets": ["mlp"], "rank": 8}) == "output-scale on mlp"
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
    apply_method(model, {"method": "lora", "targets": ["q", "v"], "rank": 2, "alpha": 8, "extra_trainable": ["head"]})
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
        apply_method(llama, {"method": "bitfit", "extra_trainable": []})
    with pytest.raises(PeftlabError, match="unknown method .bitfti.: expected one of lora, full, bitfit, head, ia3"):
        apply_method(llama, {"method": "bitfti"})


def test_the_run_config_adapter_section_is_what_apply_method_takes(tokens):
    """`config.AdapterConfig` (every method's fields in one section) and its dict form build the same model; each
    method reads only its own fields."""
    from peftlab.config import AdapterConfig

    section = AdapterConfig(method="dora", targets=["q", "v"], rank=2, alpha=8.0, extra_trainable=[],
                            prefix_length=3, adapter_size=5)
    from_section, from_dict = converted(tiny_gpt2_hf()), converted(tiny_gpt2_hf())
    assert apply_method(from_section, section) == apply_method(from_dict, vars(section))
    assert get_method("dora").settings(section) == LoRASettings(("q", "v"), 2, 8.0, 0.0)
    assert [n for n, p in from_section.named_parameters() if p.requires_grad] == \
           [n for n, p in from_dict.named_parameters() if p.requires_grad]


def test_rank_0_lora_is_full_fine_tuning():
    model = converted(tiny_gpt2_hf())
    assert apply_method(model, {"method": "lora", "rank": 0}) == []
    assert all(p.requires_grad for p in model.parameters()) and model.peftlab_method == "full"
    assert method_for({"method": "lora", "rank": 0}).name == "full"


def test_settings_an_old_run_lacks_take_their_defaults_and_unknown_keys_are_refused():
    assert get_method("prefix").settings({"method": "prefix", "prefix_length": 4}) == PrefixSettings(4, None)
    with pytest.raises(PeftlabError, match="unknown adapter setting.s. ranks; known: .*adapter_size"):
        apply_method(converted(tiny_gpt2_hf()), {"method": "lora", "ranks": 4})
    with pytest.raises(PeftlabError, match="name no method"):
        apply_method(converted(tiny_gpt2_hf()), {"rank": 4})
