"""Shared-prefix computation (peftlab.shared_prefix): a prefix computed once must give exactly what recomputing it
for every sequence gives. Inference: decoding (greedy, sampled, rows leaving) and choice scoring after a prefix
cache equal the whole prompts. Training: packed rows with the block mask give the same per-token log-probs and
the same LoRA gradients as one row per example, on GPT-2 (learned positions) and Llama (RoPE, grouped-query
attention), with the SDPA and the eager backend, and with prefix tuning's own cache in front."""

import copy
from types import SimpleNamespace

import pytest
import torch

from peftlab.engine import epoch_batches, process_share
from peftlab.generation import decode, left_pad, prefill, token_picker
from peftlab.models import convert_conv1d_to_linear
from peftlab.peft import apply_method
from peftlab.sampling import Sampling
from peftlab.shared_prefix import (IGNORE, PrefixCache, block_mask_unsupported, continuation_inputs,
                                   model_attention_mask, pack, prefix_units)
from peftlab.tasks import Encoded
from peftlab.tasks.completion import CompletionTarget, CompletionTask, score_choices

PREFIXES = [[464, 3290, 286, 1204, 318, 257], [7454, 2402], [40, 1842, 340, 994]]
SUFFIXES = [[[290, 11], [318], [257, 640, 13, 50]], [[1204, 318, 7]], [[88, 99], [101, 5, 6]]]  # per prefix


@pytest.fixture(params=["gpt2", "llama"])
def model(request, make_tiny_gpt2, make_tiny_llama):
    model = (make_tiny_gpt2 if request.param == "gpt2" else make_tiny_llama)(seed=3)
    convert_conv1d_to_linear(model)
    return model.eval()


def flat_prompts():
    """(suffixes, row of each suffix's prefix, whole prompts) over every prefix's suffixes."""
    suffixes, rows, whole = [], [], []
    for row, (prefix, its_suffixes) in enumerate(zip(PREFIXES, SUFFIXES)):
        for suffix in its_suffixes:
            suffixes.append(suffix)
            rows.append(row)
            whole.append(prefix + suffix)
    return suffixes, rows, whole


# --- inference -------------------------------------------------------------------------------------------------


def test_decoding_after_a_prefix_cache_equals_the_whole_prompts(model):
    suffixes, rows, whole = flat_prompts()
    cache = prefill(model, PREFIXES, pad_id=0)  # prefixes of 6, 2 and 4 tokens: padding inside the rows
    assert decode(model, suffixes, 8, set(), pad_id=0, prefix=cache.rows(rows)) == decode(model, whole, 8, set(), pad_id=0)
    alone = decode(model, whole, 8, set(), pad_id=0)
    stops = [{alone[0][1]}, set(), {alone[2][3]}, set(), set(), {alone[5][0]}]  # rows leave at different steps
    assert decode(model, suffixes, 8, stops, 0, prefix=cache.rows(rows)) == decode(model, whole, 8, stops, 0)
    sampled = Sampling(temperature=1.2, top_k=40, top_p=1.0, seed=5)
    assert decode(model, suffixes, 8, set(), 0, token_picker(sampled), prefix=cache.rows(rows)) == decode(
        model, whole, 8, set(), 0, token_picker(sampled))


def test_choice_scores_after_a_prefix_cache_equal_the_whole_prompts(model):
    suffixes, rows, whole = flat_prompts()
    prefix = prefill(model, PREFIXES, pad_id=0).rows(rows)
    for choices in ([[11], [13], [50]], [[11, 12], [13], [50, 51, 52]]):  # one forward pass; one per pair
        expected = score_choices(model, whole, choices, pad_id=0)
        torch.testing.assert_close(score_choices(model, suffixes, choices, 0, prefix=prefix), expected,
                                   atol=1e-5, rtol=1e-5)
    # The prefix was not used up: decoding from it again gives the same tokens.
    assert decode(model, suffixes, 4, set(), 0, prefix=prefix) == decode(model, whole, 4, set(), 0)


def per_row_copy(prefix: PrefixCache, rows: list[int]) -> PrefixCache:
    """The expansion as it was before views: a deep copy of the whole cache, then one copied row per row."""
    index = torch.tensor(rows)
    cache = copy.deepcopy(prefix.cache)
    cache.batch_select_indices(index)
    return PrefixCache(cache, prefix.attention_mask[index])


def continued_logits(model, prefix: PrefixCache, suffixes) -> torch.Tensor:
    input_ids, attention_mask, position_ids = left_pad(suffixes, 0)
    attention_mask, position_ids, cache = continuation_inputs(prefix, input_ids, attention_mask, position_ids)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache).logits


@pytest.mark.parametrize("rows", [[1] * 6, [0, 0, 0, 1, 2, 2]], ids=["one-prefix", "three-prefixes"])
@torch.inference_mode()
def test_expanded_prefix_rows_equal_per_row_copies_and_share_the_prefix_memory(model, rows):
    suffixes, _, _ = flat_prompts()
    prefix = prefill(model, PREFIXES, pad_id=0)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in prefix.cache.layers]
    expanded = prefix.rows(rows)
    assert expanded.cache is prefix.cache  # rows() adds a row index, not a copy of the keys and values
    torch.testing.assert_close(continued_logits(model, expanded, suffixes),
                               continued_logits(model, per_row_copy(prefix, rows), suffixes), atol=1e-5, rtol=1e-5)
    assert decode(model, suffixes, 4, set(), 0, prefix=expanded) == decode(
        model, [PREFIXES[row] + suffix for row, suffix in zip(rows, suffixes)], 4, set(), 0)
    for layer, (keys, values) in zip(prefix.cache.layers, before):  # continuing never wrote into the prefix
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    if len(set(rows)) == 1:  # one prefix for every row: views of its one copy, whatever the number of rows
        many = prefix.rows([1] * 1000).expanded()
        for layer, original in zip(many.layers, prefix.cache.layers):
            for tensor, source in ((layer.keys, original.keys), (layer.values, original.values)):
                assert tensor.shape[0] == 1000 and tensor.stride(0) == 0
                assert tensor.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()


def test_prefix_cache_rows_must_match_the_prompts(model):
    cache = prefill(model, PREFIXES, pad_id=0)
    with pytest.raises(ValueError, match="expand it with PrefixCache.rows"):
        decode(model, [[1], [2]], 2, set(), 0, prefix=cache)


# --- training: packed rows -----------------------------------------------------------------------------------------


def examples_sharing_prefixes() -> list[Encoded]:
    """Each prefix's questions with answers, contiguous per prefix; the prompt ends 2 tokens into the suffix."""
    examples = []
    for prefix, its_suffixes in zip(PREFIXES, SUFFIXES):
        for number, suffix in enumerate(its_suffixes):
            answer = [600 + number, 700 + len(suffix), 0]  # two answer tokens and EOS (id 0 here)
            ids = prefix + suffix + answer
            target = CompletionTarget(len(prefix) + len(suffix), None)
            examples.append(Encoded(ids, target, f"x:{len(examples)}", shared_length=len(prefix)))
    examples.append(Encoded([5, 6, 7, 8, 0], CompletionTarget(2, None), "alone"))  # shares nothing
    return examples


def completion_task(shares_prefixes: bool) -> CompletionTask:
    task = CompletionTask("toy", SimpleNamespace(pad_token_id=0, eos_token_id=0), 64, "answer")
    task.shares_prefixes = shares_prefixes
    return task


def target_log_probs(model, task, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Every target's log-prob in (row, column) order, and the summed loss of `task.forward`."""
    batch = task.collate(examples)
    output = task.forward(model, batch)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=model_attention_mask(model, batch["attention_mask"])).logits.float()
    targets = batch["targets"]
    learned = targets != IGNORE
    log_probs = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return log_probs[learned], output.loss_sum


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_rows_give_the_log_probs_and_lora_gradients_of_one_row_per_example(model, backend):
    model.config._attn_implementation = backend
    apply_method(model, {"method": "lora", "targets": ["all-linear"], "rank": 4, "alpha": 8})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_b" in name:  # B != 0: the adapters change every layer's output
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.train()  # unmerged adapters (the tiny models have no dropout)
    examples = examples_sharing_prefixes()
    gradients, log_probs = [], []
    for sharing in (True, False):
        model.zero_grad()
        values, loss_sum = target_log_probs(model, completion_task(sharing), examples)
        loss_sum.backward()
        log_probs.append(values.detach())
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert len(log_probs[0]) == 3 * len(examples)  # every answer token and EOS, once
    torch.testing.assert_close(log_probs[0], log_probs[1], atol=1e-5, rtol=1e-5)
    assert gradients[0].keys() == gradients[1].keys() and any("lora_a" in name for name in gradients[0])
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradient, gradients[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_compose_with_prefix_tuning(model):
    apply_method(model, {"method": "prefix", "prefix_length": 3})
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    examples = examples_sharing_prefixes()
    shared, _ = target_log_probs(model, completion_task(True), examples)
    unshared, _ = target_log_probs(model, completion_task(False), examples)
    torch.testing.assert_close(shared, unshared, atol=1e-5, rtol=1e-5)


def test_a_packed_row_lays_out_the_prefix_once_and_the_target_columns_last():
    row = pack([1, 2, 3], [[10, 11, 12, 13], [20, 21, 22]], first_targets=[2, 1])
    # Suffix 1 learns tokens 12, 13 (fed 11, 12); suffix 2 learns 21, 22 (fed 20, 21); final tokens are not fed.
    assert row.tokens == [1, 2, 3, 10, 11, 12, 20, 21]
    assert row.positions == [0, 1, 2, 3, 4, 5, 3, 4]
    assert row.segments == [0, 0, 0, 1, 1, 1, 2, 2]
    assert row.targets == [IGNORE, IGNORE, IGNORE, IGNORE, 12, 13, 21, 22]
    with pytest.raises(ValueError, match="first_targets must be >= 1"):
        pack([1, 2], [[3, 4]], first_targets=[0])


def test_a_backend_without_block_masks_is_named():
    assert block_mask_unsupported(SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))) is None
    reason = block_mask_unsupported(SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2")))
    assert "flash_attention_2" in reason and "computed on its own" in reason


# --- batching: units stay whole ----------------------------------------------------------------------------


def test_examples_sharing_a_prefix_are_batched_together_and_never_split():
    examples = []
    for paragraph in range(60):
        context = [paragraph + 1] * (5 + paragraph % 7)
        for question in range(1 + paragraph % 6):
            examples.append(Encoded(context + [900 + question, 0], None, f"p{paragraph}q{question}",
                                    shared_length=len(context)))
    units = prefix_units(examples, max_size=4)
    assert max(len(unit) for unit in units) == 4  # paragraphs of 5 or 6 questions are split to fit
    batches = epoch_batches(examples, 8, seed=0, epoch=0, shares_prefixes=True)
    assert sorted(index for batch in batches for unit in batch for index in unit) == list(range(len(examples)))
    assert all(sum(len(unit) for unit in batch) <= 8 for batch in batches)
    for batch in batches:
        for unit in batch:
            assert len({tuple(examples[i].input_ids[: examples[i].shared_length]) for i in unit}) == 1
    assert batches == epoch_batches(examples, 8, seed=0, epoch=0, shares_prefixes=True)
    for batch in batches:  # over 2 processes and 2 micro-batches each, every unit lands whole in one place
        micro_batches = [set(micro) for rank in range(2) for micro in process_share(batch, rank, 2, 2)]
        for unit in batch:
            assert sum(set(unit) <= micro for micro in micro_batches) == 1
