"""The one decoding loop (peftlab.generation): transformers' generate is the oracle for greedy decoding; finished
rows leaving the batch and streaming must not change a single token."""

import pytest
import torch

from peftlab.generation import decode, token_picker
from peftlab.sampling import Sampling
from peftlab.models import convert_conv1d_to_linear

PROMPTS = [[464, 3290, 286, 1204, 318], [7454, 2402, 257, 640], [40, 1842, 340, 994, 262, 6881, 290]]


@pytest.fixture(params=["gpt2", "llama"])
def model(request, make_tiny_gpt2, make_tiny_llama):
    model = (make_tiny_gpt2 if request.param == "gpt2" else make_tiny_llama)(seed=3)
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
