import copy
import io

import pytest
import torch

from peftlab import PeftlabError
from peftlab.generate import generate, read_prompt_file
from peftlab.models import convert_conv1d_to_linear

PROMPTS = ["The meaning of life is", "Once upon a time, in a land far away, there lived"]


def naive_greedy(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """Reference decoder: re-run the full sequence each step, no KV cache, no padding, argmax."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0, -new_tokens:])


@pytest.fixture
def tiny_gpt2(make_tiny_gpt2):
    model = make_tiny_gpt2(seed=1)
    convert_conv1d_to_linear(model)
    return model


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_batched_greedy_equals_naive_decoding_of_each_prompt(architecture, make_tiny_gpt2, make_tiny_llama, gpt2_tokenizer):
    model = make_tiny_gpt2(seed=1) if architecture == "gpt2" else make_tiny_llama(seed=1)
    convert_conv1d_to_linear(model)
    # Prompts of different lengths: the batch is left-padded, which must not change any continuation.
    outputs = generate(model, gpt2_tokenizer, PROMPTS, max_new_tokens=12, temperature=0)
    for prompt, (continuation,) in zip(PROMPTS, outputs):
        assert continuation == naive_greedy(model, gpt2_tokenizer, prompt, 12)


def test_converted_greedy_equals_transformers_greedy_on_the_hf_model(make_tiny_gpt2, gpt2_tokenizer):
    hf_model = make_tiny_gpt2(seed=2)
    ours = copy.deepcopy(hf_model)
    convert_conv1d_to_linear(ours)
    ids = gpt2_tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        expected = hf_model.generate(**ids, max_new_tokens=15, do_sample=False, pad_token_id=50256)
    (continuation,), = generate(ours, gpt2_tokenizer, PROMPTS[0], max_new_tokens=15, temperature=0)
    assert continuation == gpt2_tokenizer.decode(expected[0, ids["input_ids"].shape[1]:])


def test_same_seed_same_text_other_seed_other_text(tiny_gpt2, gpt2_tokenizer):
    settings = dict(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, num_samples=3)
    first = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS, seed=23006, **settings)
    again = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS, seed=23006, **settings)
    other = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS, seed=1, **settings)
    assert first == again
    assert first != other
    assert [len(samples) for samples in first] == [3, 3]
    assert len(set(first[0])) > 1  # samples of one prompt differ from each other


def test_top_k_one_is_greedy(tiny_gpt2, gpt2_tokenizer):
    greedy = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS, max_new_tokens=10, temperature=0)
    top_one = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS, max_new_tokens=10, temperature=1.5, top_k=1, seed=5)
    assert greedy == top_one


def test_stream_writes_the_generated_text(tiny_gpt2, gpt2_tokenizer):
    stream = io.StringIO()
    streamed = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS[0], max_new_tokens=10, temperature=0, stream=stream)
    batched = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS[0], max_new_tokens=10, temperature=0)
    assert streamed == batched
    assert stream.getvalue().strip() == batched[0][0].strip()


def test_prompt_longer_than_context_is_a_clear_error(tiny_gpt2, gpt2_tokenizer):
    long_prompt = " ".join(["word"] * 60)  # 60 tokens; the tiny model's context is 64
    with pytest.raises(PeftlabError, match=r"prompt 1 is 60 tokens.*context of 64 tokens.*at most 4"):
        generate(tiny_gpt2, gpt2_tokenizer, long_prompt, max_new_tokens=10)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=-1), "--temperature must be >= 0"),
        (dict(top_p=0.0), "--top-p must be in"),
        (dict(top_k=-3), "--top-k must be >= 0"),
        (dict(num_samples=0), "--num-samples must be >= 1"),
        (dict(max_new_tokens=0), "--max-new-tokens must be >= 1"),
        (dict(temperature=0, num_samples=2), "greedy decoding gives the same text"),
    ],
)
def test_bad_settings_are_rejected(tiny_gpt2, gpt2_tokenizer, settings, message):
    with pytest.raises(PeftlabError, match=message):
        generate(tiny_gpt2, gpt2_tokenizer, "hi", **settings)


def test_prompt_file_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    assert read_prompt_file(str(path)) == ["first prompt", "second prompt"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PeftlabError, match="has no prompt"):
        read_prompt_file(str(tmp_path / "empty.txt"))
    with pytest.raises(PeftlabError, match="cannot read prompt file"):
        read_prompt_file(str(tmp_path / "missing.txt"))
