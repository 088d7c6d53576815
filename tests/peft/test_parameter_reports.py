"""Parameter counts of every method on the real architectures (GPT-2 small, SmolLM2-135M), built on the meta
device (no weights, no memory), against numbers worked out by hand from the layer shapes."""

from __future__ import annotations

import pytest
import torch

from peftlab.models import SequenceClassifier, convert_conv1d_to_linear
from peftlab.peft import apply_method, parameter_report

GPT2_SMALL_TOTAL = 124_439_808
SMOLLM2_TOTAL = 134_515_008


def gpt2_small():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())  # the defaults are GPT-2 small: 12 layers, d 768, 12 heads
    convert_conv1d_to_linear(model)
    return model


def smollm2_135m():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # SmolLM2-135M's shapes
    with torch.device("meta"):
        return LlamaForCausalLM(config)


# Per layer, SmolLM2: q, o 576x576; k, v 576->192 (3 key-value heads of 64); gate, up 576->1536; down 1536->576.
# GPT-2 small: c_attn 768->2304 (q | k | v), attn.c_proj 768x768, c_fc 768->3072, mlp.c_proj 3072->768.
CASES = {
    ("smollm2", "lora r16 all-linear"): (
        {"method": "lora", "targets": ["all-linear"], "rank": 16, "alpha": 32},
        30 * 16 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))),  # 4,884,480
    ("smollm2", "dora r16 all-linear"): (
        {"method": "dora", "targets": ["all-linear"], "rank": 16, "alpha": 32},
        4_884_480 + 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576)),  # + one magnitude per output row
    ("smollm2", "ia3 k,v,down"): ({"method": "ia3", "targets": ["k", "v", "down"]}, 30 * (192 + 192 + 1536)),
    ("smollm2", "houlsby m64"): ({"method": "adapter", "adapter_size": 64}, 30 * 2 * (2 * 64 * 576 + 576 + 64)),
    ("smollm2", "pfeiffer m64"): ({"method": "adapter", "adapter_size": 64, "adapter_placement": "pfeiffer"},
                                  30 * (2 * 64 * 576 + 576 + 64)),
    ("smollm2", "prefix p10"): ({"method": "prefix", "prefix_length": 10}, 10 * 30 * 2 * 3 * 64),  # 115,200
    ("smollm2", "prefix p30"): ({"method": "prefix", "prefix_length": 30}, 30 * 30 * 2 * 3 * 64),  # 345,600
    ("smollm2", "prefix p10 projection 512"): (
        {"method": "prefix", "prefix_length": 10, "prefix_projection": 512},
        10 * 192 + (192 * 512 + 512) + (512 * 11_520 + 11_520)),
    ("smollm2", "full"): ({"method": "full"}, SMOLLM2_TOTAL),
    ("gpt2", "lora r16 all-linear"): ({"method": "lora", "targets": ["all-linear"], "rank": 16},
                                      12 * 16 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))),
    ("gpt2", "pfeiffer m64"): ({"method": "adapter", "adapter_size": 64, "adapter_placement": "pfeiffer"},
                               12 * (2 * 64 * 768 + 768 + 64)),
    ("gpt2", "prefix p30"): ({"method": "prefix", "prefix_length": 30}, 30 * 12 * 2 * 768),
    ("gpt2", "full"): ({"method": "full"}, GPT2_SMALL_TOTAL),
    ("gpt2", "lora r8 q,v slices"): ({"method": "lora", "targets": ["q", "v"], "rank": 8}, 12 * 2 * 8 * (768 + 768)),
    ("gpt2", "dora r16 all-linear"): (
        {"method": "dora", "targets": ["all-linear"], "rank": 16},
        12 * (16 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768)) + (2304 + 768 + 3072 + 768))),
    ("gpt2", "dora r8 q,v slices"): ({"method": "dora", "targets": ["q", "v"], "rank": 8},
                                     12 * 2 * (8 * (768 + 768) + 768)),  # per slice: A, B and 768 magnitudes
    ("gpt2", "ia3 k,v,down"): ({"method": "ia3", "targets": ["k", "v", "down"]}, 12 * (768 + 768 + 3072)),
    ("gpt2", "houlsby m64"): ({"method": "adapter", "adapter_size": 64}, 12 * 2 * (2 * 64 * 768 + 768 + 64)),
    ("gpt2", "prefix p10"): ({"method": "prefix", "prefix_length": 10}, 10 * 12 * 2 * 768),  # 184,320
    ("gpt2", "bitfit"): ({"method": "bitfit"},  # ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj biases; ln_f
                         12 * (768 + 2304 + 768 + 768 + 3072 + 768) + 768),
}
BUILD = {"smollm2": smollm2_135m, "gpt2": gpt2_small}
TOTAL = {"smollm2": SMOLLM2_TOTAL, "gpt2": GPT2_SMALL_TOTAL}


@pytest.mark.parametrize(("model_name", "case"), list(CASES))
def test_trainable_parameters_by_hand(model_name, case):
    settings, expected = CASES[(model_name, case)]
    model = BUILD[model_name]()
    assert parameter_report(model).total == TOTAL[model_name]
    apply_method(model, {"extra_trainable": [], **settings})
    report = parameter_report(model)
    assert report.trainable == expected
    added = 0 if settings["method"] in ("full", "bitfit") else expected  # every trainable tensor is new
    assert report.total == TOTAL[model_name] + added


def test_a_classifier_head_adds_its_own_row_per_label():
    model = SequenceClassifier(smollm2_135m().model, num_labels=2)
    apply_method(model, {"method": "prefix", "prefix_length": 10})  # the head trains by default: 2 x 576
    assert parameter_report(model).trainable == 115_200 + 2 * 576
