"""The LoRA layers: the math, initialisation, dropout placement, merge/unmerge, disabling (adapter state across
eval/train: test_adapter_state.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.peft import (
    FusedLoRALinear,
    LoRALinear,
    apply_adapters,
    disable_adapters,
    lora_layers,
    merge_adapters,
    merge_and_strip,
    merged,
    unmerge_adapters,
)

from lora_helpers import converted, randomize_adapters, tiny_gpt2_hf
from peftlab.peft.lora import Dropout

ATOL = 1e-5


def _base(seed: int = 0, k: int = 16, d: int = 24) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, d)


def _randomize(layer) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in layer.adapter_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def test_fresh_layer_is_the_base_layer_and_init_follows_the_paper():
    base = _base()
    reference = copy.deepcopy(base)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.0)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), reference(x))
    assert layer.lora_a.shape == (4, 16) and layer.lora_b.shape == (24, 4)
    assert torch.count_nonzero(layer.lora_b) == 0
    bound = 1 / math.sqrt(16)  # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(k), 1/sqrt(k))
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.std() > bound / 4
    assert isinstance(layer.dropout, nn.Identity)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_a.requires_grad and layer.lora_b.requires_grad


def test_forward_is_w0x_plus_scaled_bax():
    base = _base()
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, rank=3, alpha=12, dropout=0.0).train()
    _randomize(layer)
    x = torch.randn(2, 7, 16)
    expected = x @ w0.T + b0 + (12 / 3) * (x @ layer.lora_a.T @ layer.lora_b.T)  # by hand
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_dropout_acts_on_the_lora_branch_only():
    base = _base()
    reference = copy.deepcopy(base)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.5).train()
    assert layer.dropout_p == 0.5
    x = torch.randn(64, 16)
    assert torch.equal(layer(x), reference(x))  # B = 0: a dropout on the main path would change this
    _randomize(layer)
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second)  # the branch is stochastic in training
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), atol=0, rtol=0)


def test_a_layer_takes_the_mode_of_the_layer_it_wraps_dropout_included():
    """Adapters loaded into a model in eval mode (a checkpoint for evaluation) must not drop anything."""
    layer = LoRALinear(_base().eval(), rank=4, alpha=8, dropout=0.5)
    assert not layer.training and not layer.dropout.training
    _randomize(layer)
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), layer(x))
    assert LoRALinear(_base().train(), rank=4, alpha=8, dropout=0.5).dropout.training


def test_dropout_drops_with_probability_p_and_keeps_the_mean():
    dropout = Dropout(0.1).train()
    x = torch.ones(400, 1000)
    out = dropout(x)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.003  # 400k Bernoulli(0.1) draws: std 0.0005
    torch.testing.assert_close(out.unique(), torch.tensor([0.0, 1 / 0.9]))
    assert abs(out.mean().item() - 1.0) < 0.005  # inverted dropout keeps the expectation
    assert torch.equal(dropout.eval()(x), x)


def test_dropout_gradient_is_the_mask():
    dropout = Dropout(0.3).train()
    x = torch.randn(50, 20, requires_grad=True)
    out = dropout(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() / 0.7)


def test_merge_is_explicit_idempotent_and_exact():
    base = _base()
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, rank=4, alpha=8).train()
    _randomize(layer)
    x = torch.randn(5, 16)
    unmerged = layer(x)
    expected_weight = w0 + 2.0 * layer.lora_b.detach() @ layer.lora_a.detach()
    layer.merge()
    once = base.weight.detach().clone()
    layer.merge()  # merge twice == merge once
    assert layer.merged and torch.equal(base.weight, once)
    torch.testing.assert_close(once, expected_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=ATOL, rtol=0)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=ATOL, rtol=0)


def test_fused_slices_adapt_only_their_rows():
    base = _base(d=48)  # [q | k | v] of 16 rows each
    reference = copy.deepcopy(base)
    layer = FusedLoRALinear(base, {"q": (0, 16), "v": (32, 48)}, rank=2, alpha=6).train()
    assert set(layer.lora_a) == {"q", "v"} and layer.lora_b["v"].shape == (16, 2)
    _randomize(layer)
    x = torch.randn(4, 16)
    out, plain = layer(x), reference(x)
    torch.testing.assert_close(out[:, :16], plain[:, :16] + 3 * x @ layer.lora_a["q"].T @ layer.lora_b["q"].T, atol=ATOL, rtol=0)
    assert torch.equal(out[:, 16:32], plain[:, 16:32])  # k untouched
    torch.testing.assert_close(out[:, 32:], plain[:, 32:] + 3 * x @ layer.lora_a["v"].T @ layer.lora_b["v"].T, atol=ATOL, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer(x), out, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.base.weight[16:32], reference.weight[16:32], atol=0, rtol=0)


def test_fused_slices_reject_bad_layouts_and_ranks():
    with pytest.raises(PeftlabError, match="overlaps"):
        FusedLoRALinear(_base(d=48), {"q": (0, 20), "k": (16, 32)}, rank=2, alpha=4)
    with pytest.raises(PeftlabError, match="exceeds"):
        FusedLoRALinear(_base(d=48), {"q": (0, 8)}, rank=9, alpha=4)
    with pytest.raises(PeftlabError, match="exceeds"):
        LoRALinear(_base(), rank=17, alpha=4)
    with pytest.raises(PeftlabError, match="positive"):
        LoRALinear(_base(), rank=0, alpha=4)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_disabled_model_is_the_base_model(mode, tokens):
    hf = tiny_gpt2_hf()
    reference = converted(hf)
    model = converted(hf)
    apply_adapters(model, ["q", "v", "mlp"], rank=2, alpha=8)
    randomize_adapters(model)
    getattr(model, mode)()
    reference.eval()
    adapted = model(tokens["input_ids"]).logits
    base = reference(tokens["input_ids"]).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    was_merged = [layer.merged for _, layer in lora_layers(model)]
    with disable_adapters(model):
        torch.testing.assert_close(model(tokens["input_ids"]).logits, base, atol=ATOL, rtol=0)
        with disable_adapters(model):  # nested
            torch.testing.assert_close(model(tokens["input_ids"]).logits, base, atol=ATOL, rtol=0)
        model.eval()  # switching modes inside must not merge
        torch.testing.assert_close(model(tokens["input_ids"]).logits, base, atol=ATOL, rtol=0)
        getattr(model, mode)()
    assert [layer.merged for _, layer in lora_layers(model)] == was_merged
    torch.testing.assert_close(model(tokens["input_ids"]).logits, adapted, atol=ATOL, rtol=0)


def test_changing_lora_weights_while_merged_stays_consistent():
    base = _base()
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, rank=2, alpha=2).train()
    _randomize(layer)
    layer.merge()
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer.lora_b.mul_(3.0)  # e.g. an optimizer step or loading new weights while merged
    expected = x @ w0.T + base.bias + x @ layer.lora_a.T @ layer.lora_b.T
    torch.testing.assert_close(layer(x), expected.detach(), atol=ATOL, rtol=0)  # re-merged with the new B
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)  # W0 restored exactly


def test_merge_and_strip_gives_the_plain_architecture(tokens):
    hf = tiny_gpt2_hf()
    model = converted(hf)
    plain_names = [name for name, _ in model.named_parameters()]
    apply_adapters(model, ["q", "v", "o"], rank=2, alpha=4)
    randomize_adapters(model)
    model.train()
    adapted = model(tokens["input_ids"]).logits
    merge_adapters(model)
    merge_adapters(model)
    unmerge_adapters(model)
    merge_and_strip(model)
    assert not list(lora_layers(model))
    assert [name for name, _ in model.named_parameters()] == plain_names
    torch.testing.assert_close(model(tokens["input_ids"]).logits, adapted, atol=ATOL, rtol=0)


def test_half_precision_base_keeps_fp32_adapters_and_restores_w0_exactly():
    base = _base().to(torch.bfloat16)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, rank=4, alpha=8).train()
    assert layer.lora_a.dtype == layer.lora_b.dtype == torch.float32
    _randomize(layer)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_b.grad is not None and layer.lora_b.grad.dtype == torch.float32
    for _ in range(5):  # e.g. a merged evaluation after every epoch
        with merged(layer):
            pass
    assert torch.equal(base.weight, w0)  # bitwise: (W0 + d) - d would drift by bf16 ulps
