"""Shared fixtures: tiny random models (fast) and the real model (slow tests only)."""

import pytest
from tiny_models import tiny_gpt2, tiny_llama

pytest_plugins = ["ci_skips"]  # under CI a skipped test fails the run


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from peftlab.models import ensure_pad_token, gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    ensure_pad_token(tokenizer)
    return tokenizer


@pytest.fixture
def make_tiny_gpt2():
    """Factory of 2-layer GPT-2s with the real vocabulary, still in Hugging Face's Conv1D form."""
    return tiny_gpt2


@pytest.fixture
def make_tiny_llama():
    """Factory of 2-layer Llamas (grouped-query attention, RoPE) sized for the GPT-2 vocabulary."""
    return tiny_llama


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M model and tokenizer from the fp32 cache (`make setup` prepares it)."""
    from peftlab.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from peftlab.models import gpt2_tokenizer

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2(seed=0).save_pretrained(directory)
    gpt2_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.fixture(params=["gpt2", "llama"])
def make_model(request, make_tiny_gpt2, make_tiny_llama):
    """Factory of a tiny GPT-2 (its Conv1D layers made nn.Linear, as peftlab loads GPT-2) and of a tiny Llama:
    every test that takes it runs on both; width 256 by default (blocked products in decode_step)."""
    from peftlab.models import convert_conv1d_to_linear

    def make(width: int = 256):
        model = (make_tiny_gpt2 if request.param == "gpt2" else make_tiny_llama)(seed=4, width=width)
        convert_conv1d_to_linear(model)
        return model.eval()
    return make
