"""Shared fixtures: tiny random models (fast) and the real model (slow tests only)."""

import pytest
import torch


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from peftlab.models import ensure_pad_token, gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    ensure_pad_token(tokenizer)
    return tokenizer


@pytest.fixture
def make_tiny_gpt2():
    """Factory of 2-layer GPT-2s with the real vocabulary, still in Hugging Face's Conv1D form."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def make(seed: int = 0):
        torch.manual_seed(seed)
        config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, n_positions=64)
        return GPT2LMHeadModel(config).eval()

    return make


@pytest.fixture
def make_tiny_llama():
    """Factory of 2-layer Llamas (grouped-query attention, RoPE) sized for the GPT-2 vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed: int = 0):
        torch.manual_seed(seed)
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=50257, max_position_embeddings=64,
            bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
        )
        return LlamaForCausalLM(config).eval()

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M model and tokenizer from the fp32 cache (`make setup` prepares it)."""
    from peftlab.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftlab.models import gpt2_tokenizer

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    # No dropout inside the base model: runs that split batches differently must see the same computation.
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    gpt2_tokenizer().save_pretrained(directory)
    return str(directory)
