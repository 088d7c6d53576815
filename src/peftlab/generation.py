"""The one decoding loop, for W0's `peftlab generate` and every task that generates (instruct, qa, transfer sets).

`decode` continues a batch of token-id prompts with the KV cache:
- the prompts are left-padded, with position ids counted from the attention mask, so each row's next token is
  the last column and padding never shifts a position;
- greedy, or sampled through a `pick_next` function (`token_picker(Sampling(...))`: temperature, top-k, top-p,
  own seeded generator, so a seed gives the same text whatever else draws random numbers);
- each row stops at its own stop tokens (one set for all rows, or one per row) and, optionally, stop strings;
  a row that stopped leaves the batch (its cache rows are dropped), so a long straggler costs only its own row;
- `on_token(row, token)` sees every generated token as it comes (streaming);
- `prefix` (a `shared_prefix.PrefixCache` from `prefill`, one row per prompt) continues every prompt after its
  already computed prefix: positions start after the row's prefix, whose cache and mask come first.
transformers' `generate` is used only in the tests, as the reference this loop must match.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from peftlab.errors import PeftlabError
from peftlab.sampling import Sampling
from peftlab.shared_prefix import PrefixCache, continuation_inputs

TokenPicker = Callable[[torch.Tensor], torch.Tensor]  # (rows, vocabulary) logits -> (rows,) next token ids


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
    row_stops = [stop_ids] * len(prompts) if isinstance(stop_ids, (set, frozenset)) else list(stop_ids)
    # B prompts, T the longest, P the prefix's width (0 without one), V the vocabulary; A rows still active.
    input_ids, attention_mask, position_ids = left_pad(prompts, pad_id, device)  # (B, T) each
    cache = None
    if prefix is not None:  # mask (B, P + T), positions (B, T) shifted by each row's prefix length
        attention_mask, position_ids, cache = continuation_inputs(prefix, input_ids, attention_mask, position_ids)
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   cache=cache, use_cache=True, logits_to_keep=1)  # logits (B, 1, V); cache of P + T keys
    generated: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # the original row of each batch row; A = len(active)
    for step in range(max_new_tokens):
        logits = output.logits[:, -1]  # (A, V): the next token's, the last column (prompts are left-padded)
        next_tokens = pick_next(logits) if pick_next is not None else logits.argmax(-1)  # (A,)
        keep = []  # batch rows that go on
        for batch_row, (row, token) in enumerate(zip(active, next_tokens.tolist())):
            generated[row].append(token)
            if on_token is not None:
                on_token(row, token)
            stopped = token in row_stops[row] or (stop_strings and any(
                stop in detokenize(generated[row]) for stop in stop_strings))
            if not stopped:
                keep.append(batch_row)
        if not keep or step == max_new_tokens - 1:
            break
        cache = output.cache  # per layer, keys and values (A, kv heads, S, head size); S = P + T + step
        if len(keep) < len(active):  # finished rows leave the batch: A shrinks to len(keep)
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention_mask, position_ids, next_tokens = attention_mask[index], position_ids[index], next_tokens[index]
            active = [active[batch_row] for batch_row in keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)  # (A, S + 1)
        position_ids = position_ids[:, -1:] + 1  # (A, 1): one past each row's last position
        output = model(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, use_cache=True, logits_to_keep=1)  # input (A, 1) -> logits (A, 1, V)
    return generated


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
