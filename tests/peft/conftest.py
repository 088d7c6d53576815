"""Fixtures for the peft tests."""

from __future__ import annotations

import pytest
import torch

from lora_helpers import VOCAB


@pytest.fixture
def tokens() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(1, VOCAB, (3, 10), generator=generator)  # never the pad id 0
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
