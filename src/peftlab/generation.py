"""The one decoding loop, for W0's `peftlab generate` and every task that generates (instruct, qa, transfer sets).

`decode` continues a batch of token-id prompts with the KV cache:
- the prompts are left-padded, with position ids counted from the attention mask, so each row's next token is
  the last column and padding never shifts a position;
- greedy, or sampled through a `pick_next` function (`token_picker(Sampling(...))`: temperature, top-k, top-p,
  own seeded generator, so a seed gives the same text whatever else draws random numbers);
- each row stops at its own stop tokens (one set for all rows, or one per row; compared as one tensor) and,
  optionally, stop strings (the text of the rows still going);
- `on_token(row, token)` sees every generated token as it comes (streaming);
- `prefix` (a `shared_prefix.PrefixCache` from `prefill`, one row per prompt) continues every prompt after its
  already computed prefix: positions start after the row's prefix, whose cache and mask come first.

What makes it fast (bench/bench_generate.py --profile shows where a step's time goes): one-token steps of GPT-2
and Llama run through `decode_step` (fused products read in blocks on every thread, none of transformers' module
stack; the model's own values bit for bit, its docstring says how); the key/value cache is written in place
(`kv_cache.InPlaceLayer`: buffers as wide as the prompt plus every new token, no per-step copy); the mask and the
positions of every step are built once and sliced; a finished row stays in the batch (its token is never read)
until half the rows have finished, then they all leave in one copy of the cache, so a batch shrinks at most
log2(B) times and a long straggler still runs alone; the output projection, the largest single matrix, is
computed by `project` (the same logits bit for bit, faster).
transformers' `generate` is used only in the tests, as the reference this loop must match token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from peftlab.decode_step import (blocked_product, blocks_pay, decode_step, projection_parts, weight_blocks,
                                 without_hooks)
from peftlab.errors import PeftlabError
from peftlab.kv_cache import in_place_cache
from peftlab.sampling import Sampling
from peftlab.shared_prefix import PrefixCache, continuation_inputs
from peftlab.weights import PackedLinear, packed_steps

TokenPicker = Callable[[torch.Tensor], torch.Tensor]  # (rows, vocabulary) logits -> (rows,) next token ids
PLAIN_HEAD_MODELS = (GPT2LMHeadModel, LlamaForCausalLM)  # forward = body, then the output projection, nothing else
MAX_RESERVE = 4096  # cache columns allocated up front at most; a longer generation grows the buffers (one copy each)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of left-padded rows; positions count real tokens from 0."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, width - len(row) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def token_picker(sampling: Sampling) -> TokenPicker | None:
    """A fresh `pick_next` for `decode` with its own generator seeded by `sampling.seed` (None when greedy:
    argmax), so a seed gives the same text whatever else draws random numbers. One picker continues its
    random stream across `decode` calls (several samples in turn); a new picker starts the stream again."""
    sampling.check()
    if sampling.greedy:
        return None
    generator = torch.Generator().manual_seed(sampling.seed)
    temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / temperature  # (B, V)
        if 0 < top_k < logits.shape[-1]:
            logits, order = logits.topk(top_k, dim=-1)  # (B, k), sorted, most likely first; spares a full sort
        else:
            logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probabilities = torch.softmax(logits, dim=-1)  # (B, k) in that order
        outside = probabilities.cumsum(-1) - probabilities >= top_p  # the mass before it already reaches top_p
        choice = torch.multinomial(probabilities.masked_fill(outside, 0.0).cpu(), 1, generator=generator)  # (B, 1)
        return order.gather(-1, choice.to(order.device)).squeeze(-1)  # (B,) vocabulary ids

    return pick


@torch.inference_mode()
def decode(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: set[int] | Sequence[set[int]],
           pad_id: int, pick_next: TokenPicker | None = None, on_token: Callable[[int, int], None] | None = None,
           stop_strings: Sequence[str] = (), detokenize: Callable[[list[int]], str] | None = None,
           prefix: PrefixCache | None = None) -> list[list[int]]:
    """Continue each prompt (token ids) as one batch with the KV cache; returns each row's new tokens.

    Args:
        model: a causal LM taking input_ids, attention_mask, position_ids, cache, logits_to_keep.
        prompts: token ids per row, at least one each (after the prefix, when one is given).
        max_new_tokens: tokens generated per row at most.
        stop_ids: a row stops after emitting one of these (included in its output); one set, or one per row.
        pad_id: the id written into padding (never attended to).
        pick_next: (rows, vocabulary) logits -> next ids; None = greedy.
        on_token: called as on_token(row, token) for every generated token, in order (streaming).
        stop_strings: a row also stops once its generated text (`detokenize(tokens)`) contains one of these.
        prefix: the prompts' prefixes computed by the same model (`prefill(...).rows(...)`, one row per prompt).
    """
    if max_new_tokens < 1:
        raise PeftlabError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and detokenize is None:
        raise ValueError("stop_strings need a detokenize function")
    if any(len(prompt) == 0 for prompt in prompts):
        raise PeftlabError("an empty prompt has nothing to continue; give it at least one token")
    device = next(model.parameters()).device
    next_logits = logits_function(model)
    # B prompts, T the longest, P the prefix's width (0 without one), V the vocabulary; A rows in the batch.
    input_ids, prompt_mask, position_ids = left_pad(prompts, pad_id, device)  # (B, T) each
    start = None
    if prefix is not None:  # mask (B, P + T), positions (B, T) shifted by each row's prefix length
        prompt_mask, position_ids, start = continuation_inputs(prefix, input_ids, prompt_mask, position_ids)
    cache = in_place_cache(reserve=min(input_ids.shape[1] + max_new_tokens, MAX_RESERVE), start=start)
    # Built once, sliced per step: the mask of every column to come, each row's position at every step.
    mask = torch.cat([prompt_mask, prompt_mask.new_ones((len(prompts), max_new_tokens))], dim=1)  # (B, P + T + N)
    positions = position_ids[:, -1:] + torch.arange(1, max_new_tokens + 1, device=device)  # (B, N)
    width = prompt_mask.shape[1]
    logits = next_logits(input_ids=input_ids, attention_mask=mask[:, :width], position_ids=position_ids, cache=cache)
    stops = stop_table(stop_ids, len(prompts), device)  # (B, K)
    tokens = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, N)
    lengths = torch.zeros(len(prompts), dtype=torch.long, device=device)
    rows = torch.arange(len(prompts), device=device)  # the prompt of each batch row (A,)
    live = torch.ones(len(prompts), dtype=torch.bool, device=device)  # (A,) still generating
    for step in range(max_new_tokens):
        next_tokens = choose(logits, live, pick_next)  # (A,); a finished row's is never read
        live_rows = rows[live]
        tokens[live_rows, step] = next_tokens[live]
        lengths[live_rows] += 1
        if on_token is not None:
            for row, token in zip(live_rows.tolist(), next_tokens[live].tolist()):
                on_token(row, token)
        stopped = (next_tokens[:, None] == stops[rows]).any(-1)
        if stop_strings:
            stopped |= text_stops(tokens, lengths, rows, live, stop_strings, detokenize)
        live &= ~stopped
        live_count = int(live.sum())
        if live_count == 0 or step == max_new_tokens - 1:
            break
        if 2 * live_count <= len(live):  # half the batch has finished: the finished rows leave in one copy
            keep = live.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            mask, positions, rows, live, next_tokens = mask[keep], positions[keep], rows[keep], live[keep], next_tokens[keep]
        width += 1
        logits = next_logits(input_ids=next_tokens[:, None], attention_mask=mask[:, :width],
                             position_ids=positions[:, step : step + 1], cache=cache)  # (A, V)
    return [row[:length] for row, length in zip(tokens.tolist(), lengths.tolist())]


def choose(logits: torch.Tensor, live: torch.Tensor, pick_next: TokenPicker | None) -> torch.Tensor:
    """(A,) next tokens: argmax, or `pick_next` over the live rows only, so a sampler draws exactly as if the
    finished rows had left the batch."""
    if pick_next is None:
        return logits.argmax(-1)
    if bool(live.all()):
        return pick_next(logits)
    chosen = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    chosen[live] = pick_next(logits[live])
    return chosen


def stop_table(stop_ids: set[int] | Sequence[set[int]], rows: int, device) -> torch.Tensor:
    """(rows, K) each row's stop ids, padded with -1 (no token): a row stops where its token equals any entry."""
    row_stops = [stop_ids] * rows if isinstance(stop_ids, (set, frozenset)) else list(stop_ids)
    width = max([len(stops) for stops in row_stops] + [1])
    table = torch.full((rows, width), -1, dtype=torch.long)
    for row, stops in enumerate(row_stops):
        ids = sorted(token for token in stops if token is not None)  # a tokenizer without EOS gives None
        table[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return table.to(device)


def text_stops(tokens: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor, live: torch.Tensor,
               stop_strings: Sequence[str], detokenize: Callable[[list[int]], str]) -> torch.Tensor:
    """(A,) whether each live row's text now contains a stop string; finished rows are not read."""
    stopped = torch.zeros_like(live)
    for batch_row in live.nonzero().squeeze(-1).tolist():
        row = int(rows[batch_row])
        text = detokenize(tokens[row, : int(lengths[row])].tolist())
        stopped[batch_row] = any(stop in text for stop in stop_strings)
    return stopped


def plain_output_head(model) -> torch.nn.Module | None:
    """The output projection of a model whose forward is its body (`model.base_model`), then that projection and
    nothing else (GPT-2, Llama, no hook on the model), so a caller may run the two itself; None for any other."""
    if not isinstance(model, PLAIN_HEAD_MODELS) or not without_hooks(model):
        return None
    return model.get_output_embeddings()


def logits_function(model) -> Callable[..., torch.Tensor]:
    """forward(input_ids=, attention_mask=, position_ids=, cache=) -> (rows, V) logits of each row's last column.
    For GPT-2 and Llama with a plain output projection, a one-token step runs through `decode_step.DecodeStep`
    where it applies, else through the body, and the projection is ours (`project`): the body's hidden state and
    `F.linear` bit for bit; a packed one (`--weights`, `weights.PackedLinear`) is called as it is, and one-token
    steps read the packed weights (`weights.packed_steps`). Any other model runs whole."""
    head = plain_output_head(model)
    ours = type(head) in (torch.nn.Linear, PackedLinear) and without_hooks(head)
    if not ours or (type(head) is torch.nn.Linear and head.bias is not None):
        return lambda **inputs: model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
    output_projection = head if type(head) is PackedLinear else lambda hidden: project(hidden, head.weight)
    body = model.base_model
    step = decode_step(model)

    def forward(input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        one_token = cache is not None and input_ids.shape[1] == 1
        with packed_steps(model) if one_token else nullcontext():  # `--weights`: packed weights for steps only
            if step is not None and one_token:
                hidden = step(input_ids, attention_mask, position_ids, cache)
            else:
                hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, use_cache=True).last_hidden_state[:, -1]
            return output_projection(hidden)

    return forward


def project(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden (A, H) @ weight (V, H).T, the same logits bit for bit as `F.linear`: on a CPU as blocks of vocabulary
    rows, two per thread (`decode_step.blocked_product`), which read the weight on every thread where one product
    reads it on one (SmolLM2's 49152 x 576, `bench_roofline.py --shapes`: 20.2 against 11.4 GB/s at batch 1, 7.5
    against 5.0 at batch 8). GPUs get the one product their libraries tune."""
    parts = projection_parts()
    if not weight.is_contiguous() or not blocks_pay(weight, parts):
        return F.linear(hidden, weight)
    return blocked_product(hidden, weight_blocks(weight, parts))


@torch.inference_mode()
def prefill(model, prefixes: Sequence[Sequence[int]], pad_id: int) -> PrefixCache:
    """Run each distinct prefix once (one left-padded batch): row i of the result holds prefixes[i]; expand it
    to the prompts that continue each prefix with `.rows(...)` and pass that to `decode` or `score_choices`."""
    if any(len(prefix) == 0 for prefix in prefixes):
        raise PeftlabError("an empty prefix has nothing to compute")
    device = next(model.parameters()).device
    input_ids, attention_mask, position_ids = left_pad(prefixes, pad_id, device)
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   logits_to_keep=1)
    return PrefixCache(output.cache, attention_mask)
