"""The tiny random models every unit test builds on (seconds on a CPU): 2-layer GPT-2 and Llama, eval mode.

One definition for both vocabularies in use: the real GPT-2 one (tokenizer-level tests, saved run directories) and
a 100-token one with id 0 as BOS/EOS/pad (the peft tests, which feed random ids). No dropout, so train-mode outputs
are deterministic and runs that split batches differently compute the same thing."""

from __future__ import annotations

import torch

GPT2_VOCAB = 50257


def tiny_gpt2(seed: int = 0, vocab_size: int = GPT2_VOCAB, special_id: int = GPT2_VOCAB - 1, n_positions: int = 64,
              width: int = 32):
    """A Hugging Face GPT-2 LM, still in its Conv1D form; `special_id` is its BOS/EOS/pad token. `width` 256 makes
    its products large enough for the blocked CPU products of `decode_step`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=width, vocab_size=vocab_size, n_positions=n_positions,
                        bos_token_id=special_id, eos_token_id=special_id, pad_token_id=special_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, vocab_size: int = GPT2_VOCAB, special_id: int = GPT2_VOCAB - 1, width: int = 32):
    """A Hugging Face Llama LM with grouped-query attention and RoPE; `special_id` is its BOS/EOS/pad token;
    `width` as for `tiny_gpt2`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64,
                         bos_token_id=special_id, eos_token_id=special_id, pad_token_id=special_id)
    return LlamaForCausalLM(config).eval()
