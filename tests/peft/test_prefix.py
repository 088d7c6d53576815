"""Prefix tuning: parity with Hugging Face peft, the attention-ratio property, cached generation with left padding,
checkpoints, parameter counts and a run through the engine."""

from __future__ import annotations

import copy

import pytest
import torch

from peftlab.generation import decode, left_pad
from peftlab.peft import adapter_modules, apply_method, disable_adapters, load_adapter, parameter_report, save_adapter
from peftlab.peft.prefix import PrefixTuning

from lora_helpers import VOCAB, converted, tiny_classifier, tiny_gpt2_hf, tiny_llama_hf

ATOL = 1e-5


def make(family: str):
    return tiny_gpt2_hf() if family == "gpt2" else tiny_llama_hf()


def prefix_module(model) -> PrefixTuning:
    (_, module), = adapter_modules(model)
    return module


def randomize_prefix(model, seed: int = 4) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in prefix_module(model).adapter_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))


def padded_tokens() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(1, VOCAB, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # a right-padded row, as in training batches
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits(model, tokens):
    with torch.no_grad():
        return model(**tokens).logits


@pytest.mark.parametrize("projection", [None, 12])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_same_prefix_same_logits_as_peft(family, projection):
    from peft import PrefixTuningConfig, get_peft_model

    hf = make(family)
    ours = converted(hf)
    apply_method(ours, {"method": "prefix", "prefix_length": 5, "prefix_projection": projection})
    randomize_prefix(ours)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection is not None,
                                encoder_hidden_size=projection or 0)
    theirs = get_peft_model(copy.deepcopy(hf), config)
    encoder, module = theirs.prompt_encoder["default"], prefix_module(ours)
    with torch.no_grad():
        if projection is None:
            encoder.embedding.weight.copy_(module.prefix)
        else:
            encoder.embedding.weight.copy_(module.embedding)
            encoder.transform.load_state_dict(module.mlp.state_dict())
    tokens = padded_tokens()
    real = tokens["attention_mask"].bool()
    expected = logits(theirs.eval(), tokens)
    torch.testing.assert_close(logits(ours, tokens)[real], expected[real], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prefix_changes_the_output_disabled_is_the_base_and_only_the_prefix_trains(family):
    model = converted(make(family))
    tokens = padded_tokens()
    base = logits(model, tokens)
    apply_method(model, {"method": "prefix", "prefix_length": 4})
    assert not torch.allclose(logits(model, tokens), base, atol=1e-3)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, tokens), base)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable == [name for name in trainable if "prefix_tuning" in name] and trainable
    loss = model(**tokens).logits.square().mean()
    loss.backward()
    assert prefix_module(model).prefix.grad.abs().sum() > 0


def test_parameter_counts_by_hand():
    # GPT-2 tiny: 2 layers x (keys + values) x 2 heads x head size 16 = 128 per position
    gpt2 = converted(tiny_gpt2_hf())
    apply_method(gpt2, {"method": "prefix", "prefix_length": 5})
    assert parameter_report(gpt2).trainable == parameter_report(gpt2).adapter == 5 * 2 * 2 * 2 * 16
    # Llama tiny with GQA: 2 layers x 2 x 2 key-value heads (not 4 query heads) x head size 8 = 64 per position
    llama = converted(tiny_llama_hf())
    apply_method(llama, {"method": "prefix", "prefix_length": 5})
    assert parameter_report(llama).trainable == 5 * 2 * 2 * 2 * 8
    # the projection: embedding (5, kv width 16) + Linear(16, 12) + Linear(12, 64)
    projected = converted(tiny_llama_hf())
    apply_method(projected, {"method": "prefix", "prefix_length": 5, "prefix_projection": 12})
    assert parameter_report(projected).trainable == 5 * 16 + (16 * 12 + 12) + (12 * 64 + 64)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_prefix_leaves_the_ratio_of_content_attention_weights_unchanged(family):
    """Seed question 3.2.b: softmax over [prefix; content] rescales every content weight of a query by one factor."""
    hf = make(family)
    hf.set_attn_implementation("eager")
    base = converted(hf)
    model = copy.deepcopy(base)
    apply_method(model, {"method": "prefix", "prefix_length": 6})
    randomize_prefix(model)
    input_ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(6, 14)[None]  # the base model at the positions the prefixed model gives the content
    with torch.no_grad():
        plain = base(input_ids=input_ids, position_ids=positions, output_attentions=True).attentions[0]
        prefixed = model(input_ids=input_ids, output_attentions=True).attentions[0]
    assert prefixed.shape[-1] == plain.shape[-1] + 6
    content = prefixed[..., 6:]  # (1, heads, 8 queries, 8 content keys)
    assert bool((content.sum(-1) < 0.999).all())  # the prefix takes some of every query's attention ...
    factor = content.sum(-1, keepdim=True)
    torch.testing.assert_close(content / factor, plain, atol=1e-6, rtol=1e-5)  # ... and leaves the ratios alone
    query, j, k = 7, 2, 5
    torch.testing.assert_close(content[..., query, j] / content[..., query, k], plain[..., query, j] / plain[..., query, k])


def naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """No cache: the whole sequence through the model for every new token."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt):]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_left_padded_generation_equals_the_naive_loop(family):
    model = converted(make(family))
    apply_method(model, {"method": "prefix", "prefix_length": 3})
    randomize_prefix(model)
    prompts = [[5, 17, 23, 42, 8, 9], [11, 3], [60, 61, 62, 7]]
    batched = decode(model, prompts, max_new_tokens=6, stop_ids=set(), pad_id=0)
    assert batched == [naive_greedy(model, prompt, 6) for prompt in prompts]
    with torch.no_grad():  # and the padded forward itself matches each row alone, at every real position
        input_ids, attention_mask, position_ids = left_pad(prompts, pad_id=0)
        together = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        for row, prompt in enumerate(prompts):
            alone = model(input_ids=torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(together[row, -len(prompt):], alone, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("projection", [None, 8])
def test_checkpoint_round_trip_and_a_failed_load_leaves_the_model_as_it_came(tmp_path, projection):
    hf = tiny_llama_hf()
    model = converted(hf)
    apply_method(model, {"method": "prefix", "prefix_length": 4, "prefix_projection": projection})
    randomize_prefix(model)
    tokens = padded_tokens()
    expected = logits(model, tokens)
    save_adapter(model, tmp_path, base_model="tiny-llama")
    fresh = converted(hf)
    config = load_adapter(fresh, tmp_path, base_model="tiny-llama")
    assert config["method"] == "prefix" and config["adapters"][0]["length"] == 4
    torch.testing.assert_close(logits(fresh, tokens), expected, atol=ATOL, rtol=0)

    other = converted(tiny_gpt2_hf())  # other shapes: refused, and no prefix (or hook) is left behind
    plain = logits(other, tokens)
    with pytest.raises(Exception, match="prefix sits at|does not fit|targets layers"):
        load_adapter(other, tmp_path, base_model="tiny-llama")
    assert not list(adapter_modules(other))
    torch.testing.assert_close(logits(other, tokens), plain)


def test_a_classifier_with_a_prefix_pools_its_last_real_token():
    classifier = tiny_classifier(tiny_llama_hf())
    apply_method(classifier, {"method": "prefix", "prefix_length": 3})  # the head trains too (a random head must learn)
    randomize_prefix(classifier)
    assert {name for name, p in classifier.named_parameters() if p.requires_grad} == {
        "backbone.prefix_tuning.prefix", "score.weight"}
    tokens = padded_tokens()
    with torch.no_grad():
        together = classifier(**tokens)
        alone = classifier(tokens["input_ids"][1:2, :6], torch.ones(1, 6, dtype=torch.long))
    torch.testing.assert_close(together[1:2], alone, atol=ATOL, rtol=1e-5)


def test_bad_prefix_settings_are_clear_errors():
    with pytest.raises(Exception, match="--prefix-length must be >= 1"):
        apply_method(converted(tiny_gpt2_hf()), {"method": "prefix", "prefix_length": 0})
    with pytest.raises(Exception, match="--prefix-projection must be >= 1"):
        apply_method(converted(tiny_gpt2_hf()), {"method": "prefix", "prefix_length": 2, "prefix_projection": 0})


def test_a_prefix_run_trains_and_reloads_through_the_engine(tiny_model_dir, tmp_path):
    from test_train import tiny_config, write_cola

    from peftlab.train import evaluate_run, train

    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    config = tiny_config(tiny_model_dir, data, tmp_path / "run", epochs=2)
    config.adapter.method, config.adapter.prefix_length = "prefix", 4
    summary = train(config)
    assert summary["parameters"]["adapter"] == 4 * 2 * 2 * 32  # 2 layers x (keys + values) x d=32, per position
    again = evaluate_run(str(tmp_path / "run"), "validation", "best")
    assert again["loss"] == pytest.approx(summary["best"]["val_loss"], rel=1e-5)
