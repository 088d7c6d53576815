"""Shared-prefix computation (SPEC 5.2): sequences that start with the same tokens compute those tokens once.

SQuAD's questions on one paragraph share its context, few-shot prompts share their demonstrations, DPO's chosen
and rejected completions share their prompt. One API for all of them:

Training (`pack`): one prefix and the suffixes that share it become one sequence. Every column carries a segment
(0 = the prefix, k = the k-th suffix) and a position (the prefix counts 0..P-1, every suffix restarts at P), and
the block attention mask is

    column q sees column k  <=>  position[k] <= position[q]  and  (segment[k] == segment[q] or
                                                                  segment[k] == 0 < segment[q])

so each suffix sees the prefix and itself, causally, exactly as if it were alone after the prefix. Because the
mask and positions carry all of the order, columns may sit anywhere: `pack` puts the columns that predict a
target last, so the LM head runs on those only (`logits_to_keep`). Each column carries the token it must predict
(`targets`, IGNORE where none), so no shift ever crosses from one suffix into the next; a sequence's final token
predicts nothing and is not fed at all.

Evaluation with a loss (`continuation_cache`): the teacher-forced pass over packed rows
already computes every prompt's keys and values, so its cache, re-cut into one row per suffix (its prefix and its
own prompt columns), continues each suffix by generation: the prefix is computed once for loss and answers.

Inference (`generation.prefill` -> `PrefixCache`): the distinct prefixes are run once, as one left-padded batch,
and their key/value cache is expanded to the rows that continue them (`PrefixCache.rows`: a row index, no copy
of the keys and values). `generation.decode(..., prefix=)` and `tasks.completion.score_choices(..., prefix=)`
continue every suffix from that cache: the suffix positions start after the row's own prefix length, and the 2-D
attention mask is the prefix's mask followed by the suffix's (padding inside the row is masked, never attended).

Losses and gradients equal those of the unshared computation to fp32 tolerance (tested on GPT-2 and Llama). The
block mask is a (rows, 1, T, T) tensor, which the eager and SDPA attention backends take; others (flash
attention) cannot, and `block_mask_unsupported` says so, so the caller falls back to unshared rows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

IGNORE = -100  # a column without a target (cross_entropy's ignore_index)
PAD_SEGMENT = -1
BLOCK_MASK_BACKENDS = ("sdpa", "eager")


# ----------------------------------------------------------------------------------------------------------
# Which examples share a prefix


class PrefixSharing(Protocol):
    """What this module reads of an example (`peftlab.tasks.Encoded` is one): its tokens and how many leading
    tokens other examples may share. Stated here, so this floor needs nothing from the tasks above it."""

    @property
    def input_ids(self) -> list[int]: ...

    @property
    def shared_length(self) -> int: ...


def prefix_units(examples: Sequence[PrefixSharing], max_size: int) -> list[list[int]]:
    """Indices of examples grouped by identical shared prefix (`input_ids[:shared_length]`, length > 0), in order of
    first appearance; a group larger than `max_size` is split. Examples that share nothing are groups of one."""
    groups: dict[tuple, list[int]] = {}
    units: list[list[int]] = []
    for index, example in enumerate(examples):
        if example.shared_length <= 0:
            units.append([index])
            continue
        key = tuple(example.input_ids[: example.shared_length])
        if key not in groups:
            groups[key] = []
            units.append(groups[key])
        groups[key].append(index)
    return [unit[offset : offset + max_size] for unit in units for offset in range(0, len(unit), max_size)]


# ----------------------------------------------------------------------------------------------------------
# Training: packed rows with a block attention mask


@dataclass(frozen=True)
class PackedRow:
    """One sequence of columns: token, position, segment and the token it must predict (IGNORE = none); and per
    suffix the position of its prompt's last token, after which generation continues it."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]
    targets: list[int]
    prompt_ends: list[int]


def pack(prefix: Sequence[int], suffixes: Sequence[Sequence[int]], first_targets: Sequence[int]) -> PackedRow:
    """One prefix with its suffixes. Suffix k's token j (its position len(prefix) + j) predicts suffix token j + 1
    when that token is at index >= `first_targets[k]` of the suffix (its prompt is the tokens before); the prefix
    predicts nothing (a target inside a shared prefix would differ per suffix). Columns without a target come
    first, then those with one."""
    columns = [(token, position, 0, IGNORE) for position, token in enumerate(prefix)]
    for segment, (suffix, first) in enumerate(zip(suffixes, first_targets), start=1):
        if first < 1:
            raise ValueError("a shared prefix cannot predict its suffix's first token (first_targets must be >= 1)")
        for index, token in enumerate(suffix[:-1]):  # the last token predicts nothing
            target = suffix[index + 1] if index + 1 >= first else IGNORE
            columns.append((token, len(prefix) + index, segment, target))
    ordered = [column for column in columns if column[3] == IGNORE] + [column for column in columns if column[3] != IGNORE]
    prompt_ends = [len(prefix) + first - 1 for first in first_targets]
    return PackedRow(*(list(values) for values in zip(*ordered)), prompt_ends)


def single(tokens: Sequence[int], first_target: int) -> PackedRow:
    """An unshared sequence in the same form: token i predicts token i + 1 from index `first_target` on."""
    return pack([], [tokens], [first_target])


def collate_rows(rows: Sequence[PackedRow], pad_id: int, block_mask: bool) -> dict[str, torch.Tensor]:
    """Left-padded batch of rows: input_ids, position_ids, targets and the attention mask, a (rows, 1, T, T) bool
    block mask (True = may attend) when `block_mask`, else the (rows, T) padding mask of rows that are each one
    causal sequence. Every row's target columns end in the last column."""
    width = max(len(row.tokens) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), PAD_SEGMENT, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for index, row in enumerate(rows):
        start = width - len(row.tokens)
        for tensor, values in ((input_ids, row.tokens), (position_ids, row.positions), (segments, row.segments),
                               (targets, row.targets)):
            tensor[index, start:] = torch.tensor(values, dtype=torch.long)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "targets": targets}
    if not block_mask:
        batch["attention_mask"] = (segments != PAD_SEGMENT).long()
        return batch
    suffixes = [(row_index, segment, end) for row_index, row in enumerate(rows)
                for segment, end in enumerate(row.prompt_ends, start=1)]
    continue_rows, continue_segments, continue_ends = torch.tensor(suffixes, dtype=torch.long).T
    return batch | {"attention_mask": block_attention_mask(segments, position_ids), "segments": segments,
                    "continue_rows": continue_rows, "continue_segments": continue_segments, "continue_ends": continue_ends}


def continuation_cache(cache, batch: dict[str, torch.Tensor]) -> tuple[PrefixCache, torch.Tensor]:
    """The cache of a packed forward pass over `batch` re-cut into one row per suffix (`continue_*`): the prefix's
    columns and the suffix's own prompt columns but its last token; and that last token, from which generation
    continues. Those keys and values are exactly the unshared ones, since each column attended only to its prefix
    and its own suffix. Columns the model put in front of the input itself (prefix tuning's) are kept for every
    row, outside the mask, as the model expects. Modifies `cache`."""
    rows, segment, end = batch["continue_rows"], batch["continue_segments"][:, None], batch["continue_ends"][:, None]
    segments, positions = batch["segments"][rows], batch["position_ids"][rows]  # (suffixes, columns)
    own = segments == segment
    kept = (segments == 0) | (own & (positions < end))
    last_tokens = batch["input_ids"][rows][own & (positions == end)]  # one per suffix
    width = int(kept.sum(-1).max())
    columns = kept.long().argsort(dim=-1, stable=True)[:, -width:]  # the kept columns, in order, left-padded
    offset = cache.get_seq_length() - segments.shape[1]
    index = torch.cat([torch.arange(offset, device=rows.device).expand(len(rows), offset), columns + offset], dim=1)
    for layer in cache.layers:
        keys, values = layer.keys[rows], layer.values[rows]  # (suffixes, heads, columns, head size)
        gather = index[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        layer.keys, layer.values = keys.gather(2, gather), values.gather(2, gather)
    return PrefixCache(cache, kept.gather(-1, columns).long()), last_tokens


def single_row_continuations(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """For a batch of unpacked rows (one example per row, 2-D padding mask): the `segments` and `continue_*` that
    `continuation_cache` reads, so a loss pass over them is continued by generation too. Each row's prompt ends
    where its first target column is; None when a row has no target (nothing marks its prompt's end)."""
    targeted = batch["targets"] != IGNORE  # (B, T)
    if not bool(targeted.any(-1).all()):
        return None
    first = targeted.long().argmax(-1, keepdim=True)  # (B, 1): the column that predicts the completion's first token
    rows = torch.arange(len(targeted), device=targeted.device)
    return {"segments": torch.where(batch["attention_mask"].bool(), 1, PAD_SEGMENT), "continue_rows": rows,
            "continue_segments": torch.ones_like(rows), "continue_ends": batch["position_ids"].gather(1, first)[:, 0],
            "continue_examples": rows}


def block_attention_mask(segments: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(rows, 1, T, T) bool: query q may attend key k (see the module docstring). Padding sees only padding."""
    query_segment, key_segment = segments[:, :, None], segments[:, None, :]
    same_or_prefix = (key_segment == query_segment) | ((key_segment == 0) & (query_segment > 0))
    causal = positions[:, None, :] <= positions[:, :, None]
    return (same_or_prefix & causal)[:, None]


def attention_backend(model: torch.nn.Module) -> str | None:
    """The attention implementation of a transformers model (also when wrapped for distributed training)."""
    return getattr(getattr(getattr(model, "module", model), "config", None), "_attn_implementation", None)


def block_mask_unsupported(model: torch.nn.Module) -> str | None:
    """Why the model's attention backend cannot take a block mask, or None when it can."""
    backend = attention_backend(model)
    if backend in BLOCK_MASK_BACKENDS:
        return None
    return (f"the attention backend '{backend}' cannot take a block attention mask (only "
            f"{' and '.join(BLOCK_MASK_BACKENDS)} can), so every example is computed on its own")


def model_attention_mask(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The mask in the form the model's backend takes: a 2-D padding mask as it is; a bool block mask as it is for
    SDPA, additive (0 = attend, the dtype's minimum = not) for eager attention."""
    if mask.ndim == 2 or attention_backend(model) == "sdpa":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------------
# Inference: a prefix cache expanded over the rows that continue it


@dataclass
class PrefixCache:
    """The key/value cache of left-padded prefixes, computed once, and the rows (prompts) that continue them.

    `cache` holds one row per distinct prefix and is never written to; row i of this PrefixCache continues cache
    row `prefix_rows[i]`. Expanding over rows (`rows`) and continuing (`continuation_inputs`) copy no key or value
    per row where that can be a view: rows that all continue one prefix (few-shot demonstrations shared by every
    example) see it through `Tensor.expand` (stride 0 over rows: the memory of one row whatever the batch). Rows of
    several prefixes are gathered once, when a continuation starts (`expand_rows`).
    """

    cache: object  # a transformers Cache (DynamicLayer-s): one row per distinct prefix, never written to
    attention_mask: torch.Tensor  # (rows, prefix width), 1 = a real prefix token
    prefix_rows: torch.Tensor | None = None  # (rows,) the cache row each row continues; None: row i is cache row i

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(-1)

    def rows(self, indices: Sequence[int]) -> "PrefixCache":
        """Row i of the result is this one's row indices[i] (a row may repeat: one prefix, many suffixes). Only the
        row index and the mask are new; the keys and values stay the one computed copy."""
        index = torch.tensor(list(indices), dtype=torch.long, device=self.attention_mask.device)
        prefix_rows = index if self.prefix_rows is None else self.prefix_rows[index]
        return PrefixCache(self.cache, self.attention_mask[index], prefix_rows)

    def expanded(self) -> object:
        """A new cache object with one row per row of this PrefixCache, its tensors views of (or, over several
        prefixes, one gather from) `cache`'s. Safe to hand to the model: transformers' DynamicLayer.update
        concatenates (`torch.cat` makes new tensors and rebinds them) and never writes into the past it holds."""
        expanded = copy.copy(self.cache)
        expanded.layers = [copy.copy(layer) for layer in self.cache.layers]
        for layer in expanded.layers:
            layer.keys, layer.values = (expand_rows(tensor, self.prefix_rows) for tensor in (layer.keys, layer.values))
        return expanded


def expand_rows(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """`tensor[rows]` along the first (batch) dimension: the tensor itself when `rows` is None; an expanded view
    (no copy) when every row is the same one; else a gather (a copy of len(rows) rows)."""
    if rows is None:
        return tensor
    if len(rows) and bool((rows == rows[0]).all()):
        first = int(rows[0])
        return tensor[first : first + 1].expand(len(rows), *tensor.shape[1:])  # (rows, heads, width, head size)
    return tensor.index_select(0, rows)


def continuation_inputs(prefix: PrefixCache, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor,
                        suffix_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(attention_mask, position_ids, cache) that continue left-padded suffixes after the prefix's rows. The cache
    is a new object over the prefix's tensors (`PrefixCache.expanded`), so one prefix can be continued several
    times (generated, then scored)."""
    if len(prefix.attention_mask) != len(suffix_ids):
        raise ValueError(f"{len(suffix_ids)} suffixes for a prefix cache of {len(prefix.attention_mask)} rows; "
                         "expand it with PrefixCache.rows")
    attention_mask = torch.cat([prefix.attention_mask, suffix_mask], dim=1)  # (rows, prefix width + suffix width)
    position_ids = suffix_positions + prefix.lengths[:, None]  # each suffix starts after its own prefix
    return attention_mask, position_ids, prefix.expanded()
