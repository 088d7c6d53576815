"""Per-sequence log-probabilities (`tasks.completion.sequence_logprobs`): each example's summed log-prob of its
completion given its prompt, from one padded batch and from one packed batch whose completions share their prompt,
equal one example at a time without padding, values and LoRA gradients, on GPT-2 (learned positions) and Llama
(RoPE, grouped-query attention) with B != 0."""

from types import SimpleNamespace

import pytest
import torch

from peftlab.models import convert_conv1d_to_linear
from peftlab.peft import apply_method
from peftlab.tasks import Encoded
from peftlab.tasks.completion import CompletionTarget, CompletionTask, sequence_logprobs

EOS = 0
PROMPTS = [[464, 3290, 286, 1204, 318], [7454, 2402, 11], [40, 1842]]
COMPLETIONS = [[[257, 640], [50], [13, 14, 15]], [[1204, 7]], [[88], [101, 5, 6, 7]]]  # per prompt, EOS follows


@pytest.fixture(params=["gpt2", "llama"])
def model(request, make_tiny_gpt2, make_tiny_llama):
    model = (make_tiny_gpt2 if request.param == "gpt2" else make_tiny_llama)(seed=4)
    convert_conv1d_to_linear(model)
    apply_method(model, {"method": "lora", "targets": ["all-linear"], "rank": 4, "alpha": 8})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_b" in name:  # B != 0: the adapters change every layer's output
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.train()  # unmerged adapters (no dropout in the tiny models)


def examples() -> list[Encoded]:
    """Every prompt's completions, prompt and completion as separate token lists; the shared prefix is the prompt
    but its last token (which predicts the completion's first token inside each packed suffix)."""
    encoded = []
    for prompt, completions in zip(PROMPTS, COMPLETIONS):
        for completion in completions:
            encoded.append(Encoded(prompt + completion + [EOS], CompletionTarget(len(prompt), None),
                                   f"x:{len(encoded)}", shared_length=len(prompt) - 1))
    encoded.insert(2, Encoded([5, 6, 7, 8, EOS], CompletionTarget(3, None), "alone"))  # shares nothing, mid-batch
    return encoded


def one_at_a_time(model, example: Encoded) -> torch.Tensor:
    """log p(completion + EOS | prompt) from the example alone: no padding, no mask, plain log-softmax."""
    ids = torch.tensor([example.input_ids])
    log_probs = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]  # (T - 1, V): column t predicts t + 1
    prompt_length = example.target.prompt_length
    completion = ids[0, prompt_length:]  # (C,)
    return log_probs[prompt_length - 1 :].gather(-1, completion[:, None]).sum()


def completion_task(shares_prefixes: bool) -> CompletionTask:
    task = CompletionTask("toy", SimpleNamespace(pad_token_id=EOS, eos_token_id=EOS), 64, "answer")
    task.shares_prefixes = shares_prefixes
    return task


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_one_batch_gives_each_example_its_own_log_prob_and_gradients(model, packed):
    data = examples()
    weights = torch.linspace(-1.0, 2.0, len(data))  # a different weight per example: each one's gradient counts
    model.zero_grad()
    expected = torch.stack([one_at_a_time(model, example) for example in data])
    (expected * weights).sum().backward()
    expected_gradients = gradients(model)

    batch = completion_task(packed).collate(data)
    assert batch["attention_mask"].ndim == (4 if packed else 2)
    if packed:  # three prompts shared by their completions, one row alone
        assert len(batch["input_ids"]) == 4
    values = sequence_logprobs(model, batch)
    (values * weights).sum().backward()

    torch.testing.assert_close(values.detach(), expected.detach(), atol=1e-5, rtol=1e-5)
    got = gradients(model)
    assert got.keys() == expected_gradients.keys() and any("lora_a" in name for name in got)
    for name, gradient in got.items():
        torch.testing.assert_close(gradient, expected_gradients[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_log_probs_sum_to_minus_the_task_loss(model):
    """One objective: the per-sequence sums add up to the summed cross-entropy `CompletionTask.forward` learns."""
    task = completion_task(True)
    batch = task.collate(examples())
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(model, batch).sum(), -task.forward(model, batch).loss_sum,
                                   atol=1e-5, rtol=1e-6)
