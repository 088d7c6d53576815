"""The one decoding loop (peftlab.generation): transformers' generate is the oracle for greedy decoding; finished
rows leaving the batch and streaming must not change a single token."""

import pytest
import torch
import torch.nn.functional as F

from peftlab.generation import (
    decode,
    left_pad,
    project,
    token_picker,
)
from peftlab.decode_step import blocked_product, blocks_pay, weight_blocks
from peftlab.kv_cache import InPlaceLayer
from peftlab.models import convert_conv1d_to_linear
from peftlab.peft.prefix import apply_prefix
from peftlab.sampling import Sampling

PROMPTS = [[464, 3290, 286, 1204, 318], [7454, 2402, 257, 640], [40, 1842, 340, 994, 262, 6881, 290]]


@pytest.fixture(params=["gpt2", "llama", "gpt2-256", "llama-256"])
def model(request, make_tiny_gpt2, make_tiny_llama):
    """Width 256: products large enough that `decode_step` and `project` compute them in blocks."""
    family, _, width = request.param.partition("-")
    model = (make_tiny_gpt2 if family == "gpt2" else make_tiny_llama)(seed=3, width=int(width or 32))
    convert_conv1d_to_linear(model)
    return model.eval()


def hf_greedy(model, prompt, new_tokens):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=0, eos_token_id=None)
    return output[0, len(prompt):].tolist()


def test_batched_greedy_equals_transformers_generate_row_by_row(model):
    ours = decode(model, PROMPTS, 12, set(), pad_id=0)
    assert ours == [hf_greedy(model, prompt, 12) for prompt in PROMPTS]


def test_rows_that_stop_leave_the_batch_without_changing_the_others(model):
    alone = [decode(model, [prompt], 12, set(), pad_id=0)[0] for prompt in PROMPTS]
    stops = [{alone[0][2]}, set(), {alone[2][5]}]  # rows 0 and 2 stop early, at different steps
    together = decode(model, PROMPTS, 12, stops, pad_id=0)
    assert together[1] == alone[1]
    assert together[0] == alone[0][: alone[0].index(alone[0][2]) + 1]
    assert together[2] == alone[2][: alone[2].index(alone[2][5]) + 1]


def test_sampling_is_the_seeded_picker_applied_step_by_step(model):
    sampling = Sampling(temperature=1.3, top_k=50, top_p=0.9, seed=11)
    ours = decode(model, [PROMPTS[0]], 10, set(), pad_id=0, pick_next=token_picker(sampling))[0]
    pick, ids = token_picker(sampling), list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(10):  # the naive loop: the whole sequence again each step, no cache
            ids.append(int(pick(model(torch.tensor([ids])).logits[:, -1])[0]))
    assert ours == ids[len(PROMPTS[0]):]
    assert decode(model, [PROMPTS[0]], 10, set(), pad_id=0, pick_next=token_picker(Sampling(1.3, 50, 0.9, 12)))[0] != ours


def test_streaming_sees_every_token_in_order_and_stop_strings_end_a_row(model):
    seen = []
    rows = decode(model, PROMPTS, 6, set(), pad_id=0, on_token=lambda row, token: seen.append((row, token)))
    for row, tokens in enumerate(rows):
        assert [token for seen_row, token in seen if seen_row == row] == tokens
    target = rows[1][3]
    stopped = decode(model, PROMPTS, 6, set(), pad_id=0, stop_strings=[f"<{target}>"],
                     detokenize=lambda tokens: "".join(f"<{token}>" for token in tokens))
    for row, tokens in enumerate(rows):  # each row ends at its first occurrence of the stop text, if any
        assert stopped[row] == (tokens[: tokens.index(target) + 1] if target in tokens else tokens)


# ----------------------------------------------------------------------------------------------------------
# The fast loop (in-place cache, rows that stay until half the batch has finished, the projection in blocks)
# against references that share none of its machinery.


def naive_decode(model, prompts, new_tokens, stops, pick=None):
    """The reference: every step runs the whole left-padded sequences of the rows still going, no cache; a row
    that emits one of its stop ids leaves; the picker sees only the rows still going."""
    sequences, generated = [list(prompt) for prompt in prompts], [[] for _ in prompts]
    going = list(range(len(prompts)))
    with torch.no_grad():
        for _ in range(new_tokens):
            ids, mask, positions = left_pad([sequences[row] for row in going], pad_id=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            chosen = (pick(logits) if pick else logits.argmax(-1)).tolist()
            for row, token in zip(going, chosen):
                sequences[row].append(token)
                generated[row].append(token)
            going = [row for row, token in zip(going, chosen) if token not in stops[row]]
            if not going:
                break
    return generated


def stops_at(rows, steps):
    """Per row, the stop set that ends it at the given step (None: never), from its unstopped tokens."""
    return [{tokens[step]} - set(tokens[:step]) if step is not None else set() for tokens, step in zip(rows, steps)]


LONG_PROMPTS = PROMPTS + [[11, 12], [5000, 6000, 7000, 8000, 9000, 10000, 11000, 12000], [99]]


def test_left_padded_batch_equals_transformers_generate_on_the_same_batch(model):
    ids, mask, _ = left_pad(LONG_PROMPTS, pad_id=0)
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:].tolist()
    assert decode(model, LONG_PROMPTS, 10, set(), pad_id=0) == reference


@pytest.mark.parametrize("steps", [(1, None, 4, None, 0, 7), (2, 2, 2, 2, 2, None), (None, 0, None, None, None, None)])
def test_rows_finishing_at_different_times_equal_the_naive_loop_greedy_and_sampled(model, steps):
    """Some rows finish and stay in the batch (fewer than half), or half finish and the batch shrinks."""
    unstopped = naive_decode(model, LONG_PROMPTS, 9, [set()] * len(LONG_PROMPTS))
    stops = stops_at(unstopped, steps)
    assert decode(model, LONG_PROMPTS, 9, stops, pad_id=0) == naive_decode(model, LONG_PROMPTS, 9, stops)
    sampling = Sampling(temperature=0.8, top_k=0, top_p=0.95, seed=5)
    sampled = naive_decode(model, LONG_PROMPTS, 9, [set()] * len(LONG_PROMPTS), token_picker(sampling))
    stops = stops_at(sampled, steps)
    assert decode(model, LONG_PROMPTS, 9, stops, 0, token_picker(sampling)) == naive_decode(
        model, LONG_PROMPTS, 9, stops, token_picker(sampling))


def test_prefix_tuning_decodes_like_the_naive_loop(model):
    apply_prefix(model, length=3, projection=None)
    with torch.no_grad():
        prefix_module = next(module for module in model.modules() if hasattr(module, "prefix_states"))
        prefix_module.prefix.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))  # a prefix that matters
    unstopped = naive_decode(model, LONG_PROMPTS, 8, [set()] * len(LONG_PROMPTS))
    stops = stops_at(unstopped, (None, 1, None, 3, None, 0))
    assert decode(model, LONG_PROMPTS, 8, stops, pad_id=0) == naive_decode(model, LONG_PROMPTS, 8, stops)


def test_a_hooked_output_projection_runs_through_the_model(model):
    """Anything that changes the output projection (an adapter's hook) is honoured: the whole model runs."""
    favourite = 777
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: output.index_fill(-1, torch.tensor([favourite]), 1e4))
    assert decode(model, PROMPTS, 3, set(), pad_id=0) == [[favourite] * 3] * len(PROMPTS)


def test_the_in_place_layer_keeps_one_buffer_and_equals_concatenation():
    layer, concatenated = InPlaceLayer(reserve=5), []
    steps = [torch.randn(3, 2, width, 4) for width in (4, 1, 1, 1)]
    for index, keys in enumerate(steps):
        returned, _ = layer.update(keys, keys * 2)
        concatenated.append(keys)
        if index == 0:
            buffer = layer.key_buffer.data_ptr()
        assert torch.equal(returned, torch.cat(concatenated, dim=2)) and layer.key_buffer.data_ptr() == buffer
    layer.batch_select_indices(torch.tensor([0, 2]))
    assert torch.equal(layer.keys, torch.cat(concatenated, dim=2)[[0, 2]]) and layer.get_seq_length() == 7
    layer.update(steps[0][:2], steps[0][:2])  # past the reserve: reallocated, nothing lost
    assert torch.equal(layer.values[:, :, :7], 2 * torch.cat(concatenated, dim=2)[[0, 2]])
    assert layer.get_seq_length() == 11


@pytest.mark.parametrize("outputs, inputs", [(49152, 576), (960, 576), (3072, 576), (576, 1536), (256, 64)])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_blocked_product_is_f_linear_bit_for_bit(outputs, inputs, rows):
    """What `project` and `decode_step` rest on: blocks of output rows give each output the same dot product."""
    generator = torch.Generator().manual_seed(outputs + rows)
    weight, bias = torch.randn(outputs, inputs, generator=generator), torch.randn(outputs, generator=generator)
    x = torch.randn(rows, inputs, generator=generator)
    for parts in (2, 4):
        assert blocks_pay(weight, parts)
        assert torch.equal(blocked_product(x, weight_blocks(weight, parts)), F.linear(x, weight))
        assert torch.equal(blocked_product(x, weight_blocks(weight, parts), bias), F.linear(x, weight, bias))
        assert torch.equal(project(x, weight), F.linear(x, weight))
