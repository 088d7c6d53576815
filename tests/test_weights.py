"""--weights fp16 | int8 (peftlab.weights): packed products compute what they say (fp16 weights; int8 weights per
row times 7-bit activations with one scale per input, checked against a hand-written quantization), a packed model
is its fp32 self bit for bit outside decoding steps, stacked layers equal the layers side by side bit for bit,
adapters and DoRA's bases stay fp32, and a decoding step through decode_step gives the logits of the model's own
modules with packed weights, bit for bit."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_decode_step import METHODS, PROMPTS, perturb_adapters
from torch import nn
from transformers import DynamicCache

from peftlab import PeftlabError
from peftlab.decode_step import decode_step
from peftlab.generation import decode, left_pad, logits_function
from peftlab.kv_cache import in_place_cache
from peftlab.peft import apply_method
from peftlab.peft.base import adapter_modules, disable_adapters, merged
from peftlab.weights import PackedLinear, PackedSwitch, join_packed, pack_linear_layers, packed_steps


def linear(inputs: int = 64, outputs: int = 48, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inputs, outputs, bias=bias)


def int8_reference(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """fbgemm's dynamic int8 product written out: weights rounded to int8 with max |w| / 127 per output row; the
    input quantized to 0..127 with one scale and zero point from its min and max (0 included); int sums scaled."""
    weight_scales = layer.weight.abs().amax(1) / 127
    weight_ints = torch.round(layer.weight / weight_scales[:, None])
    low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (high - low) / 127
    zero_point = round(-low / scale)
    x_ints = torch.clamp(torch.round(x / scale) + zero_point, 0, 127) - zero_point
    return (x_ints @ weight_ints.T) * scale * weight_scales + layer.bias


def packed(layer: nn.Linear, weights: str) -> PackedLinear:
    return PackedLinear(layer, weights, PackedSwitch())


def test_fp16_computes_the_layer_with_its_weights_rounded_to_fp16():
    layer, x = linear(), torch.randn(5, 64)
    expected = F.linear(x, layer.weight.half().float(), layer.bias)
    torch.testing.assert_close(packed(layer, "fp16").packed_product(x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(layer.weight.half().float(), layer.weight)  # the rounding is real


def test_int8_is_int8_weights_per_row_times_the_input_at_7_bits_with_one_scale():
    layer, x = linear(), torch.randn(5, 64)
    with torch.no_grad():
        product = packed(layer, "int8").packed_product
        torch.testing.assert_close(product(x), int8_reference(x, layer), rtol=0, atol=1e-6)
        # One scale for the whole input: a row's outputs change when a row of larger values joins its batch.
        alone, beside_a_large_row = product(x[:1]), product(torch.cat([x[:1], 10 * x[1:2]]))[:1]
    assert not torch.equal(alone, beside_a_large_row)


@pytest.mark.parametrize("weights", ["fp16", "int8"])
@pytest.mark.parametrize("bias", [True, False])
def test_joined_layers_equal_the_layers_side_by_side_bit_for_bit(weights, bias):
    layers = [packed(linear(64, outputs, bias, seed), weights) for seed, outputs in enumerate((32, 16, 16))]
    joined = join_packed(layers)
    for rows in (1, 3, 8, 100):
        x = torch.randn(rows, 64) * 3
        assert torch.equal(joined(x), torch.cat([layer.packed_product(x) for layer in layers], dim=-1))


@pytest.mark.parametrize("weights", ["fp16", "int8"])
def test_a_packed_layer_is_the_fp32_layer_bit_for_bit_outside_decoding_steps(weights):
    model = nn.Sequential(linear()).eval()
    layer, x = model[0], torch.randn(2, 5, 64)
    pack_linear_layers(model, weights)
    with torch.no_grad():
        assert torch.equal(model(x), layer(x))  # a prompt's pass, a loss pass
        with packed_steps(model):
            assert torch.equal(model(x), model[0].packed_product(x))  # a decoding step
            assert not torch.equal(model(x), layer(x))
        assert torch.equal(model(x), layer(x))  # the switch is off again


def test_layers_of_other_kinds_or_biases_are_not_joined():
    assert join_packed([packed(linear(), "fp16"), packed(linear(), "int8")]) is None
    assert join_packed([packed(linear(), "fp16"), packed(linear(bias=False), "fp16")]) is None


def test_packing_keeps_adapters_and_doras_bases_fp32_and_int8_keeps_the_mlp_output_fp16(make_tiny_llama):
    model = make_tiny_llama(width=64)
    apply_method(model, {"method": "lora", "targets": ["q", "v"], "rank": 4, "alpha": 8})
    perturb_adapters(model)
    model.eval()
    adapters = [parameter for _, module in adapter_modules(model) for parameter in module.adapter_parameters()]
    linears = sum(type(module) is nn.Linear for module in model.modules())
    assert pack_linear_layers(model, "int8") == linears  # every base layer, the output projection included
    assert [parameter for _, module in adapter_modules(model) for parameter in module.adapter_parameters()] == adapters
    kinds = {name: module.weights for name, module in model.named_modules() if type(module) is PackedLinear}
    assert {kind for name, kind in kinds.items() if "down_proj" in name} == {"fp16"}
    assert {kind for name, kind in kinds.items() if "down_proj" not in name} == {"int8"}
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        with disable_adapters(model):
            without = model(input_ids=ids).logits
        assert not torch.allclose(model(input_ids=ids).logits, without)  # the LoRA still acts on the packed base

    dora = make_tiny_llama(width=64)
    apply_method(dora, METHODS["dora"])
    dora.eval()
    bases = [module.base for _, module in adapter_modules(dora)]
    pack_linear_layers(dora, "fp16")
    assert all(type(module.base) is nn.Linear for _, module in adapter_modules(dora))  # DoRA reads W0 itself
    assert [module.base for _, module in adapter_modules(dora)] == bases


@pytest.mark.parametrize("weights", ["fp16", "int8"])
@pytest.mark.parametrize("method", [None, "lora-all"])
def test_decoding_steps_read_the_packed_weights_and_the_prompts_pass_the_fp32_ones(make_model, weights, method):
    """logits_function on a packed model: the prompt's pass equals the fp32 model's bit for bit; each one-token
    step (decode_step, q/k/v and gate/up joined) equals the model's own modules inside `packed_steps`."""
    model = make_model()
    if method:
        apply_method(model, METHODS[method])
        perturb_adapters(model)
        model.eval()
    exact = copy.deepcopy(model)
    pack_linear_layers(model, weights)
    assert decode_step(model) is not None
    ids, mask, positions = left_pad(PROMPTS, pad_id=0)
    forward, head = logits_function(model), model.get_output_embeddings()
    ours, theirs = in_place_cache(reserve=3), DynamicCache()

    def reference(**inputs):
        return head(model.base_model(**inputs, cache=theirs, use_cache=True).last_hidden_state[:, -1])

    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions)
        assert torch.equal(forward(input_ids=ids, attention_mask=mask, position_ids=positions, cache=ours), expected)
        assert torch.equal(expected, logits_function(exact)(input_ids=ids, attention_mask=mask, position_ids=positions,
                                                            cache=in_place_cache(reserve=1)))
        for _ in range(3):
            token, positions = expected.argmax(-1, keepdim=True), positions[:, -1:] + 1
            mask = F.pad(mask, (0, 1), value=1)
            with packed_steps(model):
                expected = reference(input_ids=token, attention_mask=mask, position_ids=positions)
            assert torch.equal(forward(input_ids=token, attention_mask=mask, position_ids=positions, cache=ours),
                               expected)
    first_tokens = [row[:1] for row in decode(model, PROMPTS, 4, set(), pad_id=0)]
    assert first_tokens == [row[:1] for row in decode(exact, PROMPTS, 4, set(), pad_id=0)]


def test_packing_is_refused_in_training_mode_with_merged_adapters_and_for_unknown_kinds(make_tiny_llama):
    with pytest.raises(PeftlabError, match="inference"):
        pack_linear_layers(make_tiny_llama().train(), "int8")
    model = make_tiny_llama()
    apply_method(model, {"method": "lora", "targets": ["q", "v"], "rank": 4, "alpha": 8})
    model.eval()
    with merged(model), pytest.raises(PeftlabError, match="un-merge"):
        pack_linear_layers(model, "fp16")
    with pytest.raises(PeftlabError, match="fp32, fp16, int8"):
        pack_linear_layers(model, "int4")
    assert pack_linear_layers(model, "fp32") == 0 and not any(type(m) is PackedLinear for m in model.modules())
    pack_linear_layers(model, "int8")
    with pytest.raises(PeftlabError, match="packed already"):
        pack_linear_layers(model, "fp16")


@pytest.mark.parametrize("weights", ["fp16", "int8"])
def test_a_packed_models_own_forward_such_as_the_loss_pass_is_fp32s_bit_for_bit(make_model, weights):
    exact, packed_model = make_model(), make_model()
    pack_linear_layers(packed_model, weights)
    ids = torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        assert torch.equal(packed_model(input_ids=ids).logits, exact(input_ids=ids).logits)
