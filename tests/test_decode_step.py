"""decode_step: one-token steps of GPT-2 and Llama outside transformers' module stack must give the model's own
logits bit for bit, adapters included (called as the modules they are), and must step aside wherever they
cannot (prefix tuning's hook, dropout in training mode, hooks), so decoding never changes a token."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from peftlab.decode_step import decode_step
from peftlab.generation import decode, left_pad, logits_function
from peftlab.kv_cache import in_place_cache
from peftlab.peft import apply_method

PROMPTS = [[464, 3290, 286, 1204, 318, 11], [7454, 2402, 257], [40, 1842, 340, 994]]
METHODS = {
    "lora": {"method": "lora", "targets": ["q", "v"], "rank": 4, "alpha": 8},
    "lora-all": {"method": "lora", "targets": ["all-linear"], "rank": 4, "alpha": 8},
    "dora": {"method": "dora", "targets": ["q", "v", "mlp"], "rank": 4, "alpha": 8},
    "ia3": {"method": "ia3"},
    "adapter": {"method": "adapter"},
}


def perturb_adapters(model) -> None:
    """Adapters start as the identity (B = 0, vectors of ones); give them values that change the output."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def assert_steps_match_the_model(model, steps: int = 3) -> None:
    """The prompt's pass, then `steps` one-token steps: logits_function against the model's body with its own
    cache, then F.linear with the output embedding. (The model's own head is not the reference: torch's matmul
    takes another route for a frozen weight, so its rounding depends on requires_grad.)"""
    ids, mask, positions = left_pad(PROMPTS, pad_id=0)
    forward = logits_function(model)
    theirs, ours = DynamicCache(), in_place_cache(reserve=steps)
    head = model.get_output_embeddings().weight

    def reference(**inputs):
        return F.linear(model.base_model(**inputs, cache=theirs, use_cache=True).last_hidden_state[:, -1], head)

    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions)
        assert torch.equal(forward(input_ids=ids, attention_mask=mask, position_ids=positions, cache=ours), expected)
        for _ in range(steps):
            token, positions = expected.argmax(-1, keepdim=True), positions[:, -1:] + 1
            mask = F.pad(mask, (0, 1), value=1)
            expected = reference(input_ids=token, attention_mask=mask, position_ids=positions)
            ours_now = forward(input_ids=token, attention_mask=mask, position_ids=positions, cache=ours)
            assert torch.equal(ours_now, expected)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unmerged_adapters_step_like_the_model_bit_for_bit(make_model, method):
    model = make_model()
    apply_method(model, METHODS[method])
    perturb_adapters(model)
    model.eval()
    assert decode_step(model) is not None
    assert_steps_match_the_model(model)


@pytest.mark.parametrize("width", [32, 256])
def test_a_plain_model_steps_like_the_model_bit_for_bit(make_model, width):
    """Width 256: every product in blocks; width 32: too small for blocks, F.linear; the step either way."""
    model = make_model(width=width)
    assert decode_step(model) is not None
    assert_steps_match_the_model(model)


def test_prefix_tuning_training_mode_and_hooks_make_the_model_run_itself(make_model):
    prefixed = make_model()
    apply_method(prefixed, {"method": "prefix", "prefix_length": 3})
    assert decode_step(prefixed) is None  # its prefix acts through a hook on the body
    training = make_model().train()
    assert decode_step(training) is None  # dropout would act
    hooked = make_model()
    block = next(module for module in hooked.modules() if isinstance(module, torch.nn.ModuleList))[0]
    block.register_forward_hook(lambda module, args, output: output)
    assert decode_step(hooked) is None


def test_a_hooked_linear_layer_is_called_as_the_module_it_is(make_model):
    model = make_model()
    first_linear = next(module for module in model.modules() if isinstance(module, torch.nn.Linear))
    first_linear.register_forward_hook(lambda module, args, output: output * 2)
    assert decode_step(model) is not None
    assert_steps_match_the_model(model)


def test_the_step_is_built_once_and_again_after_a_weight_or_an_adapter_changes(make_model):
    model = make_model()
    step = decode_step(model)
    assert decode_step(model) is step
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)  # a training step between two evaluations
    rebuilt = decode_step(model)
    assert rebuilt is not step
    assert_steps_match_the_model(model)
    apply_method(model, METHODS["lora"])
    perturb_adapters(model)
    model.eval()
    assert decode_step(model) is not rebuilt
    assert_steps_match_the_model(model)


def test_decoding_with_an_adapter_equals_the_models_generate(make_model):
    model = make_model()
    apply_method(model, METHODS["lora-all"])
    perturb_adapters(model)
    model.eval()
    ids, mask, _ = left_pad(PROMPTS, pad_id=0)
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = [row[ids.shape[1]:].tolist() for row in theirs]
    assert decode(model, PROMPTS, 6, set(), pad_id=0) == expected
