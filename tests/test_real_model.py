"""The real SmolLM2-135M (slow: needs the fp32 cache that `make setup` builds)."""

import pytest
import torch

from peftlab.generate import generate
from peftlab.models import count_parameters
from peftlab.sampling import Sampling

pytestmark = pytest.mark.slow


def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2
    ((continuation,),) = generate(model, tokenizer, "The capital of France is",
                                  Sampling(temperature=0, max_new_tokens=8))
    assert "Paris" in continuation


def test_smollm2_architecture_and_tokenizer(smollm2):
    model, tokenizer = smollm2
    assert count_parameters(model) == 134_515_008
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"


def test_smollm2_batched_generation_matches_single_prompts(smollm2):
    model, tokenizer = smollm2
    prompts = ["The capital of France is", "Water boils at a temperature of"]
    batched = generate(model, tokenizer, prompts, Sampling(temperature=0, max_new_tokens=10))
    single = [generate(model, tokenizer, prompt, Sampling(temperature=0, max_new_tokens=10))[0]
              for prompt in prompts]
    assert batched == single
