"""Tiny random models for the peft tests (seconds on a CPU) and helpers to give LoRA non-trivial weights.

A plain module (not conftest) so tests import it by name; tests/peft has no __init__.py on purpose: a package
named `peft` would shadow the Hugging Face library."""

from __future__ import annotations

import copy

import torch
from torch import nn
from tiny_models import tiny_gpt2, tiny_llama

from peftlab.models import SequenceClassifier, convert_conv1d_to_linear
from peftlab.peft import lora_layers

VOCAB = 100


def tiny_gpt2_hf(seed: int = 0) -> nn.Module:
    """An unconverted Hugging Face GPT-2 LM (Conv1D layers) over VOCAB ids, in eval mode."""
    return tiny_gpt2(seed, vocab_size=VOCAB, special_id=0)


def tiny_llama_hf(seed: int = 0) -> nn.Module:
    return tiny_llama(seed, vocab_size=VOCAB, special_id=0)


def converted(hf_model: nn.Module) -> nn.Module:
    """A copy with peftlab's Conv1D -> Linear conversion (what load_model returns)."""
    model = copy.deepcopy(hf_model)
    convert_conv1d_to_linear(model)
    return model


def tiny_classifier(hf_model: nn.Module, num_labels: int = 3, seed: int = 1) -> SequenceClassifier:
    torch.manual_seed(seed)
    return SequenceClassifier(converted(hf_model).base_model, num_labels).eval()


def randomize_adapters(model: nn.Module, seed: int = 123, scale: float = 0.2) -> None:
    """Give every LoRA A and B random values (B != 0), so merging really changes weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for parameter in layer.adapter_parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def randomize_parameters(parameters, seed: int = 7, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
