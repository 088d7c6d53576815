import copy
import io
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from peftlab import PeftlabError
from peftlab.generate import complete, generate, read_prompt_file
from peftlab.generation import decode, token_picker
from peftlab.sampling import Sampling
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
    outputs = generate(model, gpt2_tokenizer, PROMPTS, Sampling(temperature=0, max_new_tokens=12))
    for prompt, (continuation,) in zip(PROMPTS, outputs):
        assert continuation == naive_greedy(model, gpt2_tokenizer, prompt, 12)


def test_converted_greedy_equals_transformers_greedy_on_the_hf_model(make_tiny_gpt2, gpt2_tokenizer):
    hf_model = make_tiny_gpt2(seed=2)
    ours = copy.deepcopy(hf_model)
    convert_conv1d_to_linear(ours)
    ids = gpt2_tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        expected = hf_model.generate(**ids, max_new_tokens=15, do_sample=False, pad_token_id=50256)
    (continuation,), = generate(ours, gpt2_tokenizer, PROMPTS[0], Sampling(temperature=0, max_new_tokens=15))
    assert continuation == gpt2_tokenizer.decode(expected[0, ids["input_ids"].shape[1]:])


def test_same_seed_same_text_other_seed_other_text(tiny_gpt2, gpt2_tokenizer):
    settings = dict(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0)
    first = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS, Sampling(seed=23006, **settings), num_samples=3)
    again = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS, Sampling(seed=23006, **settings), num_samples=3)
    other = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS, Sampling(seed=1, **settings), num_samples=3)
    assert first == again
    assert first != other
    assert [len(samples) for samples in first] == [3, 3]
    assert len(set(first[0])) > 1  # samples of one prompt differ from each other


def test_top_k_one_is_greedy(tiny_gpt2, gpt2_tokenizer):
    greedy = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS, Sampling(temperature=0, max_new_tokens=10))
    top_one = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS, Sampling(1.5, top_k=1, seed=5, max_new_tokens=10))
    assert greedy == top_one


def test_stream_writes_the_generated_text(tiny_gpt2, gpt2_tokenizer):
    stream = io.StringIO()
    greedy = Sampling(temperature=0, max_new_tokens=10)
    streamed = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS[0], greedy, stream=stream)
    batched = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS[0], greedy)
    assert streamed == batched
    assert stream.getvalue().strip() == batched[0][0].strip()


def test_prompt_longer_than_context_is_a_clear_error(tiny_gpt2, gpt2_tokenizer):
    long_prompt = " ".join(["word"] * 60)  # 60 tokens; the tiny model's context is 64
    with pytest.raises(PeftlabError, match=r"prompt 1 is 60 tokens.*context of 64 tokens.*at most 4"):
        generate(tiny_gpt2, gpt2_tokenizer, long_prompt, Sampling(max_new_tokens=10))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=-1), "--temperature must be >= 0"),
        (dict(top_p=0.0), "--top-p must be in"),
        (dict(top_k=-3), "--top-k must be >= 0"),
        (dict(max_new_tokens=0), "--max-new-tokens must be >= 1"),
        (dict(stop=["x", ""]), "--stop strings must not be empty"),
    ],
)
def test_bad_settings_are_rejected_when_made_and_when_used(tiny_gpt2, gpt2_tokenizer, settings, message):
    with pytest.raises(PeftlabError, match=message):
        Sampling(**settings)
    sampling = Sampling()
    for name, value in settings.items():  # as command-line options set them, after construction
        setattr(sampling, name, value)
    with pytest.raises(PeftlabError, match=message):
        generate(tiny_gpt2, gpt2_tokenizer, "hi", sampling)


@pytest.mark.parametrize("num_samples, temperature, message", [
    (0, 0.8, "--num-samples must be >= 1"), (2, 0, "greedy decoding gives the same text")])
def test_bad_sample_counts_are_rejected(tiny_gpt2, gpt2_tokenizer, num_samples, temperature, message):
    with pytest.raises(PeftlabError, match=message):
        generate(tiny_gpt2, gpt2_tokenizer, "hi", Sampling(temperature=temperature), num_samples=num_samples)


def test_the_defaults_are_the_generate_commands(tiny_gpt2, gpt2_tokenizer):
    assert Sampling() == Sampling(temperature=0.8, top_k=200, top_p=0.95, seed=1337, max_new_tokens=200, stop=[])
    explicit = Sampling(temperature=0.8, top_k=200, top_p=0.95, seed=1337, max_new_tokens=8)
    assert generate(tiny_gpt2, gpt2_tokenizer, PROMPTS, replace(Sampling(), max_new_tokens=8)) == generate(
        tiny_gpt2, gpt2_tokenizer, PROMPTS, explicit)


def test_a_stop_string_ends_the_continuation_with_the_token_that_completes_it(tiny_gpt2, gpt2_tokenizer):
    sampling = Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=3, max_new_tokens=12)
    prompt_ids = gpt2_tokenizer(PROMPTS[0])["input_ids"]
    tokens = decode(tiny_gpt2, [prompt_ids], 12, set(), gpt2_tokenizer.pad_token_id, token_picker(sampling))[0]
    texts = [gpt2_tokenizer.decode(tokens[:end]) for end in range(len(tokens) + 1)]  # the text after each token
    end = next(end for end in range(3, len(tokens)) if gpt2_tokenizer.decode(tokens[end - 1 : end]) not in texts[end - 1])
    stop = gpt2_tokenizer.decode(tokens[end - 1 : end])  # first appears with token `end`, not the last one
    (stopped,), = generate(tiny_gpt2, gpt2_tokenizer, PROMPTS[0], replace(sampling, stop=[stop]))
    assert stopped == texts[end] and len(stopped) < len(texts[-1])


@pytest.mark.parametrize("new_tokens, ended", [(2, True), (1, False)])
def test_complete_says_whether_a_continuation_ended_with_eos(tiny_gpt2, gpt2_tokenizer, new_tokens, ended):
    steps = []

    def eos_at_the_second_step(module, inputs, logits):  # every row's second new token is EOS
        steps.append(1)
        if len(steps) == 2:
            logits[..., gpt2_tokenizer.eos_token_id] = 1e4
        return logits

    tiny_gpt2.get_output_embeddings().register_forward_hook(eos_at_the_second_step)
    settings = Sampling(temperature=0, max_new_tokens=new_tokens)
    rows = complete(tiny_gpt2, gpt2_tokenizer, PROMPTS, settings)
    assert [[sample.ended for sample in row] for row in rows] == [[ended], [ended]]
    steps.clear()
    assert [[sample.text for sample in row] for row in rows] == generate(tiny_gpt2, gpt2_tokenizer, PROMPTS, settings)
    assert all(len(gpt2_tokenizer(row[0].text)["input_ids"]) == 1 for row in rows)  # EOS is not in the text


def test_prompt_file_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    assert read_prompt_file(str(path)) == ["first prompt", "second prompt"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PeftlabError, match="has no prompt"):
        read_prompt_file(str(tmp_path / "empty.txt"))
    with pytest.raises(PeftlabError, match="cannot read prompt file"):
        read_prompt_file(str(tmp_path / "missing.txt"))


def test_the_sampling_settings_import_without_torch():
    """The command line builds `generate`'s and `transfer-set`'s options from `Sampling` before torch loads."""
    code = "import sys, peftlab.sampling; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_prompt_escapes_are_expanded_as_in_templates():
    from peftlab.settings import expand_escapes
    from peftlab.workloads.instruct.templates import resolve_template

    assert expand_escapes(r"a\nb\tc \\n \x") == "a\nb\tc \\n \\x"
    assert resolve_template("rotten_tomatoes", r"Say\\n {text}\n") == "Say\\n {text}\n"
