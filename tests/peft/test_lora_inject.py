"""Targets by role / name / regex, errors, trainability per method, and the parameter counts of the seeds."""

from __future__ import annotations

import pytest
import torch

from peftlab.errors import PeftlabError
from peftlab.models import load_model
from peftlab.peft import (
    FusedLoRALinear,
    LoRALinear,
    apply_adapters,
    apply_method,
    lora_layers,
    mark_trainable,
    parameter_report,
)

from lora_helpers import converted, tiny_classifier, tiny_gpt2_hf, tiny_llama_hf


def _adapted(model) -> dict[str, object]:
    return {name: layer for name, layer in lora_layers(model)}


# --- targets ------------------------------------------------------------------------------------------------


def test_gpt2_roles_map_onto_the_fused_and_plain_layers():
    model = converted(tiny_gpt2_hf())
    matched = apply_adapters(model, ["q", "v", "o", "mlp"], rank=2, alpha=4)
    assert matched == [
        "transformer.h.0.attn.c_attn[q,v]", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn[q,v]", "transformer.h.1.attn.c_proj",
        "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj",
    ]
    c_attn = _adapted(model)["transformer.h.0.attn.c_attn"]
    assert isinstance(c_attn, FusedLoRALinear) and c_attn.slices == {"q": (0, 32), "v": (64, 96)}


@pytest.mark.parametrize("targets", [["q", "k", "v"], "q,k,v", ["all-linear"]])
def test_q_k_and_v_together_are_one_lora_on_the_whole_c_attn(targets):
    model = converted(tiny_gpt2_hf())
    apply_adapters(model, targets, rank=2, alpha=4)
    c_attn = _adapted(model)["transformer.h.1.attn.c_attn"]
    assert type(c_attn) is LoRALinear and c_attn.lora_b.shape == (96, 2)


def test_all_linear_never_touches_the_lm_head_or_the_classifier_head():
    model = tiny_classifier(tiny_gpt2_hf())
    matched = apply_adapters(model, "all-linear", rank=2, alpha=4)
    assert len(matched) == 2 * 4 and not any("score" in name or "lm_head" in name for name in matched)
    llama = converted(tiny_llama_hf())
    matched = apply_adapters(llama, "all-linear", rank=2, alpha=4)
    assert len(matched) == 2 * 7 and "lm_head" not in matched


def test_llama_roles():
    model = converted(tiny_llama_hf())
    matched = apply_adapters(model, ["q", "v", "mlp"], rank=2, alpha=4)
    assert matched == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert _adapted(model)["model.layers.0.self_attn.v_proj"].lora_b.shape == (16, 2)  # 2 kv heads x 8


def test_names_suffixes_and_regexes():
    model = converted(tiny_gpt2_hf())
    assert apply_adapters(model, ["transformer.h.0.attn.c_attn"], rank=2, alpha=4) == ["transformer.h.0.attn.c_attn"]
    assert apply_adapters(model, ["c_fc"], rank=2, alpha=4) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert apply_adapters(model, [r"transformer\.h\.1\.(attn|mlp)\.c_proj"], rank=2, alpha=4) == [
        "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj",
    ]


def test_errors_say_what_matched_nothing_and_list_candidates():
    model = converted(tiny_gpt2_hf())
    with pytest.raises(PeftlabError, match=r"matched no linear layer.*transformer\.h\.\*\.attn\.c_attn"):
        apply_adapters(model, ["q_proj"], rank=2, alpha=4)
    with pytest.raises(PeftlabError, match="not linear layers"):
        apply_adapters(model, ["attn"], rank=2, alpha=4)
    with pytest.raises(PeftlabError, match="rank 0 means --method full"):
        apply_adapters(model, ["q"], rank=0, alpha=4)
    with pytest.raises(PeftlabError, match="positive"):
        apply_adapters(model, ["q"], rank=-1, alpha=4)
    with pytest.raises(PeftlabError, match=r"larger than min\(d, k\) = 32 of transformer.h.0.attn.c_attn\[q\]"):
        apply_adapters(model, ["q", "mlp"], rank=33, alpha=4)
    assert not list(lora_layers(model))  # a failed call changes nothing
    with pytest.raises(PeftlabError, match="invalid|not a valid regular expression"):
        apply_adapters(model, ["h.(0"], rank=2, alpha=4)
    apply_adapters(model, ["c_fc"], rank=2, alpha=4)
    with pytest.raises(PeftlabError, match="already have an adapter"):
        apply_adapters(model, ["c_fc"], rank=2, alpha=4)
    with pytest.raises(PeftlabError, match="already have an adapter.*one apply_adapters call"):
        apply_adapters(model, ["mlp"], rank=2, alpha=4)


def test_roles_need_a_known_architecture():
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with pytest.raises(PeftlabError, match="GPT-2 and Llama-family models only.*Linear layers: 0, 2"):
        apply_adapters(block, ["q"], rank=2, alpha=4)
    assert apply_adapters(block, ["0"], rank=2, alpha=4) == ["0"]


# --- trainability ---------------------------------------------------------------------------------------------


def _trainable(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_lora_trains_the_adapters_and_the_head_of_a_classifier_by_default():
    model = tiny_classifier(tiny_gpt2_hf())
    apply_method(model, {"method": "lora", "targets": ["q", "v"], "rank": 2, "alpha": 4})
    assert _trainable(model) == {
        "backbone.h.0.attn.c_attn.lora_a.q", "backbone.h.0.attn.c_attn.lora_a.v",
        "backbone.h.0.attn.c_attn.lora_b.q", "backbone.h.0.attn.c_attn.lora_b.v",
        "backbone.h.1.attn.c_attn.lora_a.q", "backbone.h.1.attn.c_attn.lora_a.v",
        "backbone.h.1.attn.c_attn.lora_b.q", "backbone.h.1.attn.c_attn.lora_b.v",
        "score.weight",
    }


def test_extras_norms_biases_and_the_methods():
    llama = converted(tiny_llama_hf())
    apply_method(llama, {"method": "lora", "targets": ["o"], "rank": 2, "alpha": 4, "extra_trainable": ["norms"]})
    norms = {f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    assert _trainable(llama) - {n for n in _trainable(llama) if ".lora_" in n} == norms | {"model.norm.weight"}

    gpt2 = converted(tiny_gpt2_hf())
    mark_trainable(gpt2, "bitfit")
    assert _trainable(gpt2) and all(name.endswith(".bias") for name in _trainable(gpt2))
    assert len(_trainable(gpt2)) == 2 * 6 + 1  # per block: ln_1, c_attn, c_proj, ln_2, c_fc, c_proj; plus ln_f
    mark_trainable(gpt2, "full")
    assert _trainable(gpt2) == {name for name, _ in gpt2.named_parameters()}

    classifier = tiny_classifier(tiny_gpt2_hf())
    mark_trainable(classifier, "head")
    assert _trainable(classifier) == {"score.weight"}
    mark_trainable(classifier, "bitfit", extra=["head", "norms"])
    assert "score.weight" in _trainable(classifier) and "backbone.ln_f.weight" in _trainable(classifier)
    assert "backbone.h.0.mlp.c_fc.weight" not in _trainable(classifier)

    lora_biases = converted(tiny_gpt2_hf())
    apply_method(lora_biases, {"method": "lora", "targets": ["q"], "rank": 2, "alpha": 4,
                               "extra_trainable": ["biases"]})
    assert "transformer.h.0.attn.c_attn.base.bias" in _trainable(lora_biases)
    assert "transformer.h.0.attn.c_attn.base.weight" not in _trainable(lora_biases)


def test_rank_zero_is_full_fine_tuning_and_method_errors():
    model = converted(tiny_gpt2_hf())
    assert apply_method(model, {"method": "lora", "rank": 0}) == []
    assert parameter_report(model).trainable == parameter_report(model).total
    with pytest.raises(PeftlabError, match="no LoRALayer modules. Fix: apply_method"):
        mark_trainable(converted(tiny_gpt2_hf()), "lora")
    with pytest.raises(PeftlabError, match="no classifier head"):
        mark_trainable(converted(tiny_gpt2_hf()), "head")
    with pytest.raises(PeftlabError, match="unknown method"):
        apply_method(converted(tiny_gpt2_hf()), {"method": "prompt-tuning"})
    with pytest.raises(PeftlabError, match="unknown extra"):
        mark_trainable(converted(tiny_gpt2_hf()), "bitfit", extra=["embeddings"])
    adapted = converted(tiny_gpt2_hf())
    apply_adapters(adapted, ["q"], rank=2, alpha=4)
    with pytest.raises(PeftlabError, match="method 'full'"):
        mark_trainable(adapted, "full")


# --- the seeds' numbers (full-size architectures on the meta device: counts do not depend on weights) ---------


def _meta_model(name: str, task: str = "classification"):
    with torch.device("meta"):
        model, _ = load_model(name, task=task, init="random")
    return model


@pytest.mark.parametrize(
    ("name", "total", "trainable", "lines"),
    [
        ("gpt2", 125_031_168, 629_760,
         ["Number of parameters: 125.03M", "Trainable parameters: 0.63M (629,760)", "Reduction: 99.50%"]),
        ("gpt2-medium", 356_398_080, 1_675_264,
         ["Number of parameters: 356.40M", "Trainable parameters: 1.68M (1,675,264)", "Reduction: 99.53%"]),
    ],
)
def test_seed_parameter_report(name, total, trainable, lines):
    """Rank 4 on every block linear (c_attn, attn.c_proj, c_fc, mlp.c_proj) + LayerNorms + head trainable."""
    model = _meta_model(name)
    apply_method(model, {"method": "lora", "targets": ["all-linear"], "rank": 4, "alpha": 64,
                         "extra_trainable": ["head", "norms"]})
    report = parameter_report(model)
    assert (report.total, report.trainable) == (total, trainable)
    for line in lines:
        assert line in report.lines()
    assert str(report).splitlines() == report.lines()


def test_seed_adapter_counts():
    small = _meta_model("gpt2", task="causal-lm")
    apply_adapters(small, ["c_attn"], rank=8, alpha=16)
    assert parameter_report(small).adapter == 294_912  # 12 x 8 x (768 + 2304)
    medium = _meta_model("gpt2-medium", task="causal-lm")
    apply_adapters(medium, ["q", "k", "v"], rank=128, alpha=512)
    assert parameter_report(medium).adapter == 12_582_912  # 24 x 128 x (1024 + 3072): one LoRA on the fused c_attn
