"""IA3: identity at init, the scaling by hand, merged == unmerged, parity with Hugging Face peft's IA3."""

from __future__ import annotations

import copy

import pytest
import torch

from peftlab.peft import adapter_modules, apply_method, disable_adapters, load_adapter, merge_adapters, parameter_report
from peftlab.peft import save_adapter, unmerge_adapters
from peftlab.peft.ia3 import IA3Linear

from lora_helpers import converted, tiny_gpt2_hf, tiny_llama_hf

ATOL = 1e-5


def randomize_ia3(model, seed: int = 3) -> None:
    """Scales around 1 (never 0), so that every merge changes weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in adapter_modules(model):
            for parameter in module.adapter_parameters():
                parameter.copy_(1 + 0.5 * torch.randn(parameter.shape, generator=generator))


def logits(model, tokens):
    with torch.no_grad():
        return model(**tokens).logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_identity_at_init_then_merged_equals_unmerged_and_disabled_is_the_base(family, tokens):
    hf = tiny_gpt2_hf() if family == "gpt2" else tiny_llama_hf()
    model = converted(hf)
    base = logits(model, tokens)
    apply_method(model, {"method": "ia3", "targets": ["k", "v", "down"], "extra_trainable": []})
    torch.testing.assert_close(logits(model, tokens), base)  # every vector starts at one
    randomize_ia3(model)
    unmerged = logits(model, tokens)
    assert not torch.allclose(unmerged, base, atol=1e-3)
    merge_adapters(model)
    merge_adapters(model)  # twice == once
    torch.testing.assert_close(logits(model, tokens), unmerged, atol=ATOL, rtol=0)
    unmerge_adapters(model)
    torch.testing.assert_close(logits(model, tokens), unmerged, atol=ATOL, rtol=0)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, tokens), base, atol=ATOL, rtol=0)


def test_output_and_input_scaling_by_hand():
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 4)
    x = torch.randn(2, 3)
    attention = IA3Linear(copy.deepcopy(linear), feedforward=False)
    feedforward = IA3Linear(copy.deepcopy(linear), feedforward=True)
    with torch.no_grad():
        attention.ia3_l.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        feedforward.ia3_l.copy_(torch.tensor([3.0, 1.0, 0.0]))
    expected_out = (x @ linear.weight.T + linear.bias) * torch.tensor([1.0, 2.0, 0.5, -1.0])  # bias scaled too
    expected_in = (x * torch.tensor([3.0, 1.0, 0.0])) @ linear.weight.T + linear.bias  # bias not scaled
    torch.testing.assert_close(attention(x), expected_out)
    torch.testing.assert_close(feedforward(x), expected_in)
    with pytest.raises(Exception, match="zero entry"):
        feedforward.merge()


def test_gpt2_k_and_v_slices_leave_the_queries_unscaled(tokens):
    model = converted(tiny_gpt2_hf())
    apply_method(model, {"method": "ia3", "targets": ["k", "v"], "extra_trainable": []})
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, IA3Linear) and list(layer.slices) == ["k", "v"]
    randomize_ia3(model)
    x = torch.randn(5, 32)
    plain, scaled = layer.base(x), layer(x)
    torch.testing.assert_close(scaled[:, :32], plain[:, :32])  # q rows: untouched
    torch.testing.assert_close(scaled[:, 32:64], plain[:, 32:64] * layer.ia3_l["k"])
    # parameters: per block k (32) + v (32) outputs; nothing else trains
    report = parameter_report(model)
    assert report.adapter == report.trainable == 2 * (32 + 32)


def test_llama_parameter_count_and_checkpoint_round_trip(tmp_path, tokens):
    hf = tiny_llama_hf()
    model = converted(hf)
    apply_method(model, {"method": "ia3", "targets": ["k", "v", "down"], "extra_trainable": []})
    # per layer: k and v outputs (2 kv heads x 8 = 16 each) + the down projection's input (intermediate 64)
    assert parameter_report(model).adapter == 2 * (16 + 16 + 64)
    randomize_ia3(model)
    expected = logits(model, tokens)
    save_adapter(model, tmp_path, base_model="tiny-llama")
    fresh = converted(hf)
    config = load_adapter(fresh, tmp_path, base_model="tiny-llama")
    assert config["method"] == "ia3" and config["adapters"][-1]["feedforward"] is True
    torch.testing.assert_close(logits(fresh, tokens), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_same_vectors_same_logits_as_peft_ia3(family, tokens):
    from peft import IA3Config, get_peft_model

    hf = tiny_gpt2_hf() if family == "gpt2" else tiny_llama_hf()
    ours = converted(hf)
    # peft scales the whole fused c_attn of GPT-2; naming the module gives ours the same shape.
    targets, feedforward = ((["c_attn", "mlp.c_proj"], ["mlp.c_proj"]) if family == "gpt2"
                            else (["k_proj", "v_proj", "down_proj"], ["down_proj"]))
    apply_method(ours, {"method": "ia3", "targets": targets, "extra_trainable": []})
    randomize_ia3(ours)
    theirs = get_peft_model(copy.deepcopy(hf), IA3Config(target_modules=targets, feedforward_modules=feedforward,
                                                         fan_in_fan_out=family == "gpt2"))
    vectors = {name: module.ia3_l for name, module in adapter_modules(ours)}
    copied = 0
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if ".ia3_l." in name:
                module = name.removeprefix("base_model.model.").split(".ia3_l.")[0]
                parameter.copy_(vectors[module].detach().view_as(parameter))
                copied += 1
    assert copied == len(vectors)
    torch.testing.assert_close(logits(theirs.eval(), tokens), logits(ours, tokens), atol=ATOL, rtol=1e-5)


def test_an_ia3_run_trains_and_reloads_through_the_engine(tiny_model_dir, tmp_path):
    from test_train import tiny_config, write_cola

    from peftlab.train import evaluate_run, train

    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    config = tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=2)
    config.adapter.method, config.adapter.targets = "ia3", ["k", "v", "down"]
    summary = train(config)
    assert summary["parameters"]["adapter"] == 2 * (32 + 32 + 128)  # GPT-2 d=32: k, v outputs + 4d intermediate
    again = evaluate_run(str(tmp_path / "run"), "validation", "best")
    assert again["loss"] == pytest.approx(summary["best"]["val_loss"], rel=1e-5)
