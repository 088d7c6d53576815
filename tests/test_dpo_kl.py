"""The sequence KL of DPO's evaluation (`workloads.dpo.kl.sequence_kl`) against an exact enumeration: on a vocabulary of
8 tokens every completion of up to 3 tokens is listed with its probability under the policy and the reference, computed
without padding, so both estimators' expectations under the policy can be compared with the exact KL."""

import itertools
import math
from contextlib import nullcontext

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

from peftlab.models import convert_conv1d_to_linear
from peftlab.peft.base import adapter_parameters, disable_adapters
from peftlab.peft.prepare import apply_method
from peftlab.workloads.dpo.kl import sequence_kl
from peftlab.workloads.dpo.reference import ReferenceState, reference_model

VOCAB, EOS, MAX_NEW = 8, 7, 3
PROMPTS = ([3], [1, 4, 2])  # of different lengths, so the batch is padded


def lora_policy(make):
    """A tiny LM with a random LoRA adapter: the policy; with its adapter disabled, the reference."""
    model = make(seed=0, vocab_size=VOCAB, special_id=EOS)
    convert_conv1d_to_linear(model)  # as `models.load_model` gives GPT-2
    apply_method(model, {"method": "lora", "targets": ["q", "v", "mlp"], "rank": 2, "alpha": 8})
    generator = torch.Generator().manual_seed(1)
    for parameter in adapter_parameters(model):
        parameter.data = torch.randn(parameter.shape, generator=generator) * 2.0
    return model.eval()


def every_completion() -> list[list[int]]:
    """Every sequence the sampler can produce with at most MAX_NEW tokens: it stops at EOS or at the limit."""
    words = [token for token in range(VOCAB) if token != EOS]
    shorter = [list(body) + [EOS] for length in range(MAX_NEW - 1) for body in itertools.product(words, repeat=length)]
    longest = [list(body) + [last] for body in itertools.product(words, repeat=MAX_NEW - 1) for last in range(VOCAB)]
    return shorter + longest


def log_probabilities(model, prompt: list[int], completions: list[list[int]], temperature: float) -> list[float]:
    """log p(completion | prompt) of each completion, from unpadded passes (completions of one length together)."""
    result = {}
    for length in {len(completion) for completion in completions}:
        group = [completion for completion in completions if len(completion) == length]
        ids = torch.tensor([prompt + completion for completion in group])
        with torch.inference_mode():
            log_probs = (model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double()
                         / temperature).log_softmax(-1)[:, len(prompt) - 1 : -1]  # (rows, length, V)
        sums = log_probs.gather(-1, ids[:, len(prompt) :, None])[..., 0].sum(-1)
        result.update(zip(map(tuple, group), sums.tolist()))
    return [result[tuple(completion)] for completion in completions]


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_both_estimators_average_to_the_exact_sequence_kl_under_the_policy(make, temperature):
    model = lora_policy(make)
    completions = every_completion()
    rows = [(prompt, completion) for prompt in PROMPTS for completion in completions]
    estimates = sequence_kl(model, lambda: disable_adapters(model), [p for p, _ in rows], [c for _, c in rows],
                            pad_id=EOS, temperature=temperature)
    for number, prompt in enumerate(PROMPTS):
        policy = log_probabilities(model, prompt, completions, temperature)
        with disable_adapters(model):
            reference = log_probabilities(model, prompt, completions, temperature)
        probabilities = [math.exp(value) for value in policy]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)  # the enumeration is every possible completion
        exact = sum(p * (lp - lr) for p, lp, lr in zip(probabilities, policy, reference))
        assert exact > 0.01  # the adapter moves the policy enough for the comparison to mean something
        own = slice(number * len(completions), (number + 1) * len(completions))
        ratios, kls = estimates.log_ratio[own].double(), estimates.kl[own].double()
        # Each sample's log-ratio is log π(y) − log π_ref(y), whatever the padding of its batch row.
        exact_ratios = torch.tensor(policy, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
        torch.testing.assert_close(ratios, exact_ratios, atol=2e-5, rtol=0)
        weights = torch.tensor(probabilities, dtype=torch.float64)
        assert float(weights @ ratios) == pytest.approx(exact, abs=1e-5)
        assert float(weights @ kls) == pytest.approx(exact, abs=1e-5)
        assert float(kls.min()) >= 0.0
        assert float(kls.std()) < float(ratios.std())  # the full-distribution estimator has less spread


def test_the_kl_of_a_policy_against_itself_is_zero_and_never_negative_otherwise():
    model = lora_policy(tiny_gpt2)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (length,), generator=generator).tolist() for length in (1, 5, 2, 7)]
    completions = [torch.randint(0, VOCAB, (length,), generator=generator).tolist() for length in (4, 1, 6, 3)]
    same = sequence_kl(model, nullcontext, prompts, completions, pad_id=EOS)
    assert same.kl.tolist() == [0.0] * 4 and same.log_ratio.tolist() == [0.0] * 4
    moved = sequence_kl(model, lambda: disable_adapters(model), prompts, completions, pad_id=EOS)
    assert bool((moved.kl > 0).all())


def test_an_empty_completion_has_no_kl_and_its_neighbours_are_unchanged():
    model = lora_policy(tiny_gpt2)
    reference = lambda: disable_adapters(model)
    alone = sequence_kl(model, reference, [[1, 2]], [[3, 4, EOS]], pad_id=EOS)
    together = sequence_kl(model, reference, [[5], [1, 2]], [[], [3, 4, EOS]], pad_id=EOS)
    assert together.kl[0] == 0.0 and together.log_ratio[0] == 0.0
    torch.testing.assert_close(together.kl[1:], alone.kl, atol=1e-5, rtol=0)


def test_the_reference_may_be_a_frozen_adapter_swapped_in_by_dpo():
    model = lora_policy(tiny_gpt2)
    prompts, completions = [[1, 2], [5]], [[3, 4, EOS], [6, 0]]
    parameters = [(name, parameter) for name, parameter in model.named_parameters() if ".lora_" in name]
    zero_update = ReferenceState("zero update", tuple(
        (parameter, torch.zeros_like(parameter) if "lora_b" in name else parameter.detach().clone())
        for name, parameter in parameters))
    frozen = sequence_kl(model, lambda: reference_model(model, zero_update), prompts, completions, pad_id=EOS)
    disabled = sequence_kl(model, lambda: disable_adapters(model), prompts, completions, pad_id=EOS)
    torch.testing.assert_close(frozen.kl, disabled.kl, atol=1e-6, rtol=0)
    itself = ReferenceState("itself", tuple((parameter, parameter.detach().clone()) for _, parameter in parameters))
    assert sequence_kl(model, lambda: reference_model(model, itself), prompts, completions, EOS).kl.abs().max() < 1e-6
